"""The whole Snakemake DAG on a tiny configuration, plus config validation and rerun rules."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import tiny_assets
from fdpipe.common.io import read_metadata
from tiny_dag import TINY, snakemake


def planned_jobs(workdir, *args, configfile=TINY) -> dict[str, int]:
    """Rule -> job count of a dry run."""
    out = snakemake(workdir, "--dry-run", "--quiet", "rules", *args, configfile=configfile).stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            counts[parts[0]] = int(parts[1])
    return counts


def test_whole_dag_outputs(finished_run):
    work = finished_run
    summary = pd.read_parquet(work / "results/report/summary.parquet")
    assert {"policy", "metric", "value", "ci_low", "ci_high"} <= set(summary.columns)
    assert set(summary["policy"]) >= {"sft", "rkl", "fkl", "js", "tv", "chi2", "rchi2"}
    curves = pd.read_parquet(work / "results/report/curves.parquet")
    assert set(curves["run"]) == {"rkl", "fkl", "js", "tv", "chi2", "rchi2", "feat_pointwise", "feat_moments",
                                  "lora_bf16"}
    for name in ("summary", "curves"):
        meta = read_metadata(work / f"results/report/{name}.parquet")
        assert meta["config_hash"] and meta["packages"]["torch"]
    for png in ("frontier.png", "curves.png", "features.png"):
        assert (work / "results/report" / png).stat().st_size > 1000
    for run in ("rkl", "js", "tv"):
        metrics = pd.read_parquet(work / f"results/align/{run}/metrics.parquet")
        assert list(metrics["step"]) == [1, 2]
        assert metrics["logprob_gap"].iloc[0] < 1e-3 or run == "tv"   # tv samples from an offline proposal
    js_target = (work / "results/align/js/target.json").read_text()
    assert '"lambda": null' not in js_target
    pq.read_table(work / "results/eval/rkl/samples.parquet")


def test_the_tiny_config_has_a_pointwise_and_a_distributional_target_over_two_features():
    import yaml

    from fdpipe.common.config import merged_run_config, validate_config

    tiny = validate_config(yaml.safe_load(TINY.read_text()), TINY.parent.parent.parent / "workflow" / "schemas" /
                           "config.schema.yaml")
    targets = [merged_run_config(tiny["alignment"], run)["target"] for run in tiny["alignment"]["runs"]]
    over_features = sorted((t["kind"], len(t["features"])) for t in targets if t.get("features"))
    assert over_features == [("distributional", 2), ("pointwise", 2)]


def test_targets_over_features_on_the_language_model(finished_run):
    """A 2-feature pointwise and a 2-feature distributional target: each feature's moment is
    logged per step and evaluated per policy, the requested moments beside them."""
    work = finished_run
    moments = pd.read_parquet(work / "results/align/feat_moments/metrics.parquet")
    assert {"feature_has_e", "feature_reward", "lambda_has_e", "lambda_reward"} <= set(moments.columns)
    pointwise = pd.read_parquet(work / "results/align/feat_pointwise/metrics.parquet")
    assert {"feature_positive", "feature_has_e"} <= set(pointwise.columns)
    assert not any(c.startswith("lambda_") for c in pointwise.columns)
    assert not any(c.startswith("feature_") for c in pd.read_parquet(work / "results/align/js/metrics.parquet"))
    target = json.loads((work / "results/align/feat_moments/target.json").read_text())
    assert target["lambda_fit"]["moments"] == pytest.approx({"has_e": 0.6, "reward": 0.2}, abs=1e-3)
    summary = pd.read_parquet(work / "results/report/summary.parquet")
    rows = summary[summary["metric"].str.startswith("feature_")]
    assert set(zip(rows["run"], rows["metric"])) == {
        ("feat_pointwise", "feature_positive"), ("feat_pointwise", "feature_has_e"),
        ("feat_moments", "feature_has_e"), ("feat_moments", "feature_reward")}
    assert set(rows["policy"]) == {"sft", "feat_pointwise", "feat_moments"}
    requested = rows[rows["run"] == "feat_moments"].groupby("metric")["requested"].first().to_dict()
    assert requested == {"feature_has_e": 0.6, "feature_reward": 0.2}
    assert rows[rows["run"] == "feat_pointwise"]["requested"].isna().all()
    assert summary[~summary["metric"].str.startswith("feature_")]["requested"].isna().all()
    samples = pd.read_parquet(work / "results/eval/feat_moments/samples.parquet")
    assert (samples["feature_has_e"] == samples["completion"].str.contains("e")).all()


def test_a_lora_run_in_bf16_with_micro_batches(finished_run):
    """Run lora_bf16: LoRA adapters, bf16 autocast, micro-batches of 3 of the step's 4 sequences;
    the sampling/training log-prob gap is logged (at bf16 rounding level), the saved model is
    the merged one and the adapter lies beside it."""
    from transformers import AutoModelForCausalLM

    work = finished_run
    metrics = pd.read_parquet(work / "results/align/lora_bf16/metrics.parquet")
    assert list(metrics["step"]) == [1, 2]
    assert metrics["logprob_gap"].between(0, 0.05).all()
    assert (work / "results/align/lora_bf16/model/adapter/adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(work / "results/align/lora_bf16/model").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(work / "results/sft/model").state_dict()
    changed = {name for name in sft if not torch.equal(sft[name], merged[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    assert "lora" not in " ".join(merged)
    assert "lora_bf16" in set(pd.read_parquet(work / "results/report/summary.parquet")["policy"])


def test_logs_benchmarks_and_no_state_left(finished_run):
    work = finished_run
    for rule, name in [("prepare_data", "prepare_data"), ("sft", "sft"), ("train_reward", "train_reward"),
                       ("align", "rkl"), ("evaluate", "sft"), ("evaluate", "rkl"), ("report", "report")]:
        assert (work / "logs" / rule / f"{name}.log").is_file(), (rule, name)
        assert (work / "benchmarks" / rule / f"{name}.tsv").is_file(), (rule, name)
    # the resume state is removed once each training stage has finished
    for state in ("results/sft/state.pt", "results/reward/state.pt", "results/align/rkl/state.pt"):
        assert not (work / state).exists(), state


def test_saved_models_reload(finished_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for path in ("results/sft/model", "results/align/rkl/model"):
        AutoModelForCausalLM.from_pretrained(finished_run / path)
    AutoModelForSequenceClassification.from_pretrained(finished_run / "results/reward/model")


def test_nothing_left_to_do(finished_run):
    assert planned_jobs(finished_run) == {}


def test_one_run_change_reruns_only_that_run(finished_run, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY.read_text().replace("rkl: {divergence: rkl}", "rkl: {divergence: rkl, lr: 0.5}"))
    assert planned_jobs(finished_run, configfile=changed) == {"align": 1, "evaluate": 1, "report": 1, "all": 1}


def test_a_feature_change_reruns_the_runs_that_use_it(finished_run, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY.read_text().replace("positive: {kind: reward, threshold: 0.0}",
                                                "positive: {kind: reward, threshold: 0.5}"))
    assert planned_jobs(finished_run, configfile=changed) == {"align": 1, "evaluate": 1, "report": 1, "all": 1}
    changed.write_text(TINY.read_text().replace('pattern: "e"', 'pattern: "a"'))
    assert planned_jobs(finished_run, configfile=changed) == {"align": 2, "evaluate": 2, "report": 1, "all": 1}


def test_sft_change_reruns_everything_downstream(finished_run, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY.read_text().replace("  steps: 4\n  batch_size: 8\n  lr: 1.0e-3",
                                                "  steps: 5\n  batch_size: 8\n  lr: 1.0e-3", 1))
    jobs = planned_jobs(finished_run, configfile=changed)
    assert jobs == {"sft": 1, "align": 9, "evaluate": 10, "report": 1, "all": 1}


def test_bad_config_value_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("lr: 1.0e-3\n    train_layers", "lr: -1\n    train_layers"))
    out = snakemake(tmp_path, "--dry-run", configfile=bad, check=False)
    assert out.returncode != 0
    assert "config key 'alignment.defaults.lr': expected a value > 0, got -1" in out.stdout + out.stderr


def test_missing_data_file_names_the_path(tmp_path):
    tiny_assets.build_tiny_lm(tmp_path / "tiny" / "lm")
    out = snakemake(tmp_path, "--cores", "1", "results/data/sft_train.parquet", check=False)
    assert out.returncode != 0
    assert "tiny/reviews.csv" in out.stdout + out.stderr
    assert not (tmp_path / "results" / "data").exists() or not any((tmp_path / "results" / "data").iterdir())


def test_empty_dataset_stops_without_outputs(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "reviews.csv").write_text("id,text,rating\n")
    out = snakemake(tmp_path, "--cores", "1", "results/data/sft_train.parquet", check=False)
    assert out.returncode != 0
    assert "reviews.csv" in out.stdout + out.stderr
    data_dir = tmp_path / "results" / "data"
    assert not data_dir.exists() or not any(data_dir.iterdir())



def test_readme_tables_come_from_the_run(finished_run):
    snakemake(finished_run, "--cores", "1", "results/report/readme_tables.md")
    text = (finished_run / "results/report/readme_tables.md").read_text()
    assert "Produced by commit `" in text and "CPU cores" in text
    assert "| align rkl |" in text and "| sft |" in text and "**sum**" in text
    summary = pd.read_parquet(finished_run / "results/report/summary.parquet")
    gold = summary[(summary.policy == "js") & (summary.run == "js") & (summary.metric == "gold_mean")].iloc[0]
    assert f"| js | {gold.value:.3f} [{gold.ci_low:.3f}, {gold.ci_high:.3f}]".replace("-", "−") in text
    sft_loss = pd.read_parquet(finished_run / "results/sft/metrics.parquet").query("split == 'val' and metric == 'loss'")
    assert f"to {sft_loss['value'].iloc[-1]:.3f}" in text
    # runs over features: each feature's moment under SFT and the run, the request beside it
    moment = summary[(summary.policy == "feat_moments") & (summary.metric == "feature_has_e")].iloc[0]
    assert f"| feat_moments (js) | has_e | 0.60 | " in text
    assert f"| {moment.value:.3f} [{moment.ci_low:.3f}, {moment.ci_high:.3f}] |".replace("-", "−") in text
    assert "| feat_pointwise (fkl) | positive | — | " in text


def test_readme_tables_go_into_the_marked_block(tmp_path):
    from fdpipe.common.errors import DataError
    from fdpipe.stages.readme_tables import END, START, splice

    readme, tables = tmp_path / "README.md", tmp_path / "tables.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nold numbers\n{END}\nafter\n")
    tables.write_text("| new | numbers |\n")
    splice(readme, tables)
    assert readme.read_text() == f"# x\n\nbefore\n{START}\n| new | numbers |\n{END}\nafter\n"
    splice(readme, tables)                                         # again: the same text
    assert readme.read_text().count("new") == 1
    readme.write_text("no markers\n")
    with pytest.raises(DataError, match="expected one block between"):
        splice(readme, tables)
    with pytest.raises(DataError, match="no tables here"):
        splice(readme, tmp_path / "missing.md")
