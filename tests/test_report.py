"""Report stage on synthetic evaluation summaries and training metrics."""
import numpy as np
import pandas as pd
import pytest

from fdpipe.stages import report
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.tables import SUMMARY_COLUMNS, summary_frame, summary_row
from fdpipe.common.io import read_metadata, read_parquet, write_parquet


def _summary(policy, run, divergence, target, kl, gold):
    rows = [summary_row(policy, run, divergence, target, "kl_pi_sft", kl, kl - 0.1 * (kl > 0), kl + 0.1 * (kl > 0), 20),
            summary_row(policy, run, divergence, target, "gold_mean", gold, gold - 0.05, gold + 0.05, 20),
            summary_row(policy, run, divergence, target, "reward_mean", gold * 2, gold * 2 - 0.1, gold * 2 + 0.1, 20),
            summary_row(policy, run, divergence, target, "self_bleu", 0.3, n=20)]
    if policy != "sft":
        rows += [summary_row("sft", run, divergence, target, "kl_pi_p", 1.0, 0.8, 1.2, 20)]
    return summary_frame(rows)


def _metrics(run, divergence, steps=6):
    rng = np.random.default_rng(len(run))
    return pd.DataFrame({"run": run, "divergence": divergence, "target": "rlhf(beta=0.1)",
                         "step": np.arange(1, steps + 1), "objective": rng.normal(size=steps),
                         "reward_mean": np.linspace(0, 1, steps), "gold_mean": np.linspace(0, 0.5, steps),
                         "kl_pi_a": np.linspace(0, 2, steps), "lambda": np.nan})


@pytest.fixture
def inputs(tmp_path):
    paths = {"summaries": [], "metrics": []}
    for policy, div, kl, gold in (("sft", None, 0.0, 0.1), ("rkl_a", "rkl", 1.5, 0.4), ("js_a", "js", 0.8, 0.3)):
        path = tmp_path / "eval" / policy / "summary.parquet"
        write_parquet(_summary(policy, "sft" if policy == "sft" else policy, div,
                               None if div is None else "rlhf(beta=0.1)", kl, gold), path,
                      {"config_hash": f"hash-{policy}"})
        paths["summaries"].append(path)
    for run, div in (("rkl_a", "rkl"), ("js_a", "js")):
        path = tmp_path / "align" / run / "metrics.parquet"
        write_parquet(_metrics(run, div), path, {"config_hash": f"hash-{run}"})
        paths["metrics"].append(path)
    return paths


def _outputs(tmp_path):
    out = tmp_path / "report"
    return [out / n for n in ("summary.parquet", "curves.parquet", "frontier.png", "frontier.svg", "curves.png",
                              "curves.svg")]


def test_report_tables_metadata_and_plots(inputs, tmp_path):
    outs = _outputs(tmp_path)
    report.run(inputs["summaries"], inputs["metrics"], *outs, {"smoothing": 2}, config={"report": "x"}, seed=3)
    summary = read_parquet(outs[0])
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert len(summary) == 4 + 5 + 5
    assert set(summary["policy"]) == {"sft", "rkl_a", "js_a"}
    assert set(summary[summary["policy"] == "sft"]["run"]) == {"sft", "rkl_a", "js_a"}
    curves = read_parquet(outs[1])
    assert list(curves.columns) == ["run", "divergence", "target", "step", "metric", "value"]
    assert set(curves["metric"]) == {"objective", "reward_mean", "gold_mean", "kl_pi_a"}   # all-NaN lambda left out
    assert len(curves) == 2 * 6 * 4
    kl = curves[(curves["run"] == "rkl_a") & (curves["metric"] == "kl_pi_a")].sort_values("step")["value"]
    assert np.allclose(kl, np.linspace(0, 2, 6))
    for path in outs[:2]:
        meta = read_metadata(path)
        assert meta["stage"] == "report" and meta["config_hash"] and meta["seed"] == 3
        assert meta["sources"][str(inputs["summaries"][1])] == "hash-rkl_a"
        assert set(meta["columns"]) == set(summary.columns if path == outs[0] else curves.columns)
    assert outs[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and outs[4].read_bytes()[:4] == b"\x89PNG"
    for svg in (outs[3], outs[5]):
        text = svg.read_text()
        assert "<svg" in text and "</svg>" in text
    assert "rkl_a" in outs[3].read_text()        # run labels on the frontier


def test_report_without_alignment_runs(inputs, tmp_path):
    outs = _outputs(tmp_path)
    summary, curves = report.run(inputs["summaries"][:1], [], *outs)
    assert curves.empty and list(curves.columns) == list(report.CURVE_COLUMNS)
    assert len(read_parquet(outs[1])) == 0 and outs[5].exists()
    assert (summary["policy"] == "sft").all()


def test_report_errors(inputs, tmp_path):
    outs = _outputs(tmp_path)
    missing = tmp_path / "eval" / "nope" / "summary.parquet"
    with pytest.raises(DataError, match="nope/summary.parquet: file not found"):
        report.run(inputs["summaries"] + [missing], inputs["metrics"], *outs)
    with pytest.raises(DataError, match="missing column"):
        report.run(inputs["summaries"] + [inputs["metrics"][0]], [], *outs)
    bad = tmp_path / "bad_metrics.parquet"
    write_parquet(pd.DataFrame({"step": [1], "loss": [0.1]}), bad)
    with pytest.raises(DataError, match="bad_metrics.parquet: missing column"):
        report.run(inputs["summaries"], [bad], *outs)
    with pytest.raises(DataError, match="more than one summary"):
        report.run(inputs["summaries"] + inputs["summaries"][:1], [], *outs)
    with pytest.raises(ConfigError, match="report.smoothing"):
        report.run(inputs["summaries"], [], *outs, {"smoothing": 0})
    with pytest.raises(ConfigError, match="report.colour"):
        report.ReportConfig.from_dict({"colour": "red"})
    assert not any(p.exists() for p in outs)
