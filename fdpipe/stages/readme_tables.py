"""The README's tables of a run, written from its outputs (rule `readme_tables`).

The README shows what the default run produced: seconds per job, how SFT and the reward model
trained, and the held-out results of every policy with their intervals. This stage writes
those tables as Markdown from the run's own files, with the commit, the machine and the date
that produced them, so the numbers in the README are copied from the code's output rather
than typed:

    snakemake --cores all results/report/readme_tables.md
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
from pathlib import Path

import pandas as pd

from fdpipe.common.io import atomic_path, code_version, package_versions, read_parquet
from fdpipe.common.tables import SUMMARY_COLUMNS

log = logging.getLogger("fdpipe.readme_tables")

METRIC_COLUMNS = {"step": None, "split": "text", "metric": "text", "value": "number"}
# (column title, summary metric, digits, with interval)
POLICY_COLUMNS = [("gold (VADER compound)", "gold_mean", 3, True), ("proxy reward (sd units)", "reward_mean", 2, True),
                  ("KL(π‖SFT)", "kl_pi_sft", 2, False), ("entropy / token", "entropy_per_token", 2, False),
                  ("distinct-2", "distinct_2", 3, False), ("self-BLEU", "self_bleu", 3, False)]


def _number(value: float, digits: int) -> str:
    return "—" if pd.isna(value) else f"{value:,.{digits}f}".replace("-", "−")


def machine() -> str:
    """The machine in a few words: processor, CPU cores, operating system."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"


def job_seconds(benchmark_dir) -> pd.DataFrame:
    """Seconds of every job from Snakemake's benchmark files (benchmarks/<rule>/<name>.tsv)."""
    rows = []
    for path in sorted(Path(benchmark_dir).glob("*/*.tsv")):
        if path.parent.name == "readme_tables":     # this job's own file (a rerun finds the last one)
            continue
        table = pd.read_csv(path, sep="\t")
        rows.append({"rule": path.parent.name, "job": path.stem, "s": float(table["s"].sum())})
    return pd.DataFrame(rows, columns=["rule", "job", "s"])


def time_table(jobs: pd.DataFrame) -> list[str]:
    lines = ["| job | s |", "|---|---|"]
    for row in jobs.itertuples():
        name = row.rule if row.job == row.rule else f"{row.rule} {row.job}"
        lines.append(f"| {name} | {_number(row.s, 1)} |")
    lines.append(f"| **sum** | **{_number(jobs['s'].sum(), 1)}** |")
    return lines


def training_lines(sft_metrics: pd.DataFrame, reward_metrics: pd.DataFrame) -> list[str]:
    val = sft_metrics[(sft_metrics["split"] == "val") & (sft_metrics["metric"] == "loss")].sort_values("step")
    steps = int(sft_metrics["step"].max())
    last = reward_metrics[(reward_metrics["split"] == "val")]
    last = last[last["step"] == last["step"].max()].set_index("metric")["value"]
    return [f"SFT ({steps} steps) lowers the validation loss from {val['value'].iloc[0]:.3f} to "
            f"{val['value'].iloc[-1]:.3f}; the reward model reaches a held-out pair accuracy of "
            f"{last['pair_accuracy']:.3f} (mean margin {last['margin_mean']:.2f}, Pearson {last['pearson']:.3f} / "
            f"Spearman {last['spearman']:.3f} with the held-out human ratings)."]


def policy_table(summary: pd.DataFrame) -> list[str]:
    """One row per policy (its own metrics: policy == run), value [ci_low, ci_high] where intervals exist."""
    own = summary[summary["policy"] == summary["run"]]
    header = ["policy"] + [title for title, *_ in POLICY_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    policies = ["sft"] + sorted(p for p in own["policy"].unique() if p != "sft")
    for policy in policies:
        rows = own[own["policy"] == policy].set_index("metric")
        divergence = rows["divergence"].dropna().iloc[0] if rows["divergence"].notna().any() else None
        cells = [policy if divergence in (None, policy) else f"{policy} ({divergence})"]
        for _, metric, digits, interval in POLICY_COLUMNS:
            if metric not in rows.index:
                cells.append("—")
                continue
            row = rows.loc[metric]
            cells.append(_with_interval(row, digits) if interval else _number(row["value"], digits))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def divergence_lines(summary: pd.DataFrame) -> list[str]:
    """Each run's own D_f(π‖p) estimate, for the SFT model and for the run's policy."""
    rows = summary[(summary["metric"] == "objective") & (summary["run"] != "sft")]
    out = []
    for run, part in rows.groupby("run", sort=True):
        by_policy = part.set_index("policy")
        if {"sft", run} <= set(by_policy.index):
            sft, own = by_policy.loc["sft"], by_policy.loc[run]
            out.append(f"- {run} ({own['divergence']}): {_number(sft['value'], 3)} "
                       f"[{_number(sft['ci_low'], 3)}, {_number(sft['ci_high'], 3)}] for the SFT model → "
                       f"{_number(own['value'], 3)} [{_number(own['ci_low'], 3)}, {_number(own['ci_high'], 3)}]")
    return out


def _with_interval(row, digits: int) -> str:
    text = _number(row["value"], digits)
    if pd.notna(row["ci_low"]):
        text += f" [{_number(row['ci_low'], digits)}, {_number(row['ci_high'], digits)}]"
    return text


def feature_table(summary: pd.DataFrame) -> list[str]:
    """For every run whose target is written over features: each feature's E[φ] under the SFT
    model and under the run's policy, the requested moment (— for a condition) and the run's KL."""
    rows = summary[summary["metric"].astype(str).str.startswith("feature_")]
    if rows.empty:
        return []
    kl = summary[(summary["metric"] == "kl_pi_sft") & (summary["policy"] == summary["run"])].set_index("run")["value"]
    lines = ["| run | feature | requested E[φ] | SFT | aligned | KL(π‖SFT) |", "|---|---|---|---|---|---|"]
    for (run, metric), part in rows.groupby(["run", "metric"], sort=True):
        by_policy = part.set_index("policy")
        if not {"sft", run} <= set(by_policy.index):
            continue
        requested = by_policy.loc[run].get("requested", float("nan"))
        lines.append(f"| {run} ({by_policy.loc[run, 'divergence']}) | {metric.removeprefix('feature_')} | "
                     f"{_number(requested, 2)} | {_with_interval(by_policy.loc['sft'], 3)} | "
                     f"{_with_interval(by_policy.loc[run], 3)} | {_number(kl.get(run, float('nan')), 2)} |")
    return ["Targets over features: E[φ] of each feature (95% bootstrap intervals over prompts):", "", *lines, ""]


def run(*, summary_path, sft_metrics_path, reward_metrics_path, benchmark_dir, out_path) -> str:
    """Write the Markdown tables of one run to `out_path` and return them."""
    summary = read_parquet(summary_path, required=list(SUMMARY_COLUMNS), min_rows=1)
    sft_metrics = read_parquet(sft_metrics_path, required=METRIC_COLUMNS, min_rows=1)
    reward_metrics = read_parquet(reward_metrics_path, required=METRIC_COLUMNS, min_rows=1)
    jobs = job_seconds(benchmark_dir)
    versions = package_versions()
    n = summary[(summary["policy"] == "sft") & (summary["metric"] == "gold_mean")]["n"]
    text = "\n".join([
        "<!-- written by rule readme_tables (fdpipe.stages.readme_tables) -->",
        f"Produced by commit `{code_version()}` on {_dt.date.today().isoformat()}, machine: {machine()}; "
        f"torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}.",
        "",
        "Seconds per job (Snakemake benchmark files):",
        "",
        *time_table(jobs),
        "",
        *training_lines(sft_metrics, reward_metrics),
        "",
        f"Held-out results ({int(n.iloc[0]) if len(n) else '?'} samples per policy; 95% bootstrap intervals over prompts):",
        "",
        *policy_table(summary),
        "",
        *feature_table(summary),
        "Importance-sampling estimates of each run's own D_f(π‖p) (interval: ± z·standard error):",
        "",
        *divergence_lines(summary),
        "",
    ])
    with atomic_path(out_path) as tmp:
        tmp.write_text(text)
    log.info("wrote %s", out_path)
    return text


START, END = "<!-- readme_tables: start -->", "<!-- readme_tables: end -->"


def splice(readme_path, tables_path) -> None:
    """Replace the README's block between `START` and `END` by the tables at `tables_path`."""
    from fdpipe.common.errors import DataError

    readme, tables = Path(readme_path), Path(tables_path)
    if not tables.is_file():
        raise DataError(tables, "no tables here: run `snakemake --cores all results/report/readme_tables.md` first")
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise DataError(readme, f"expected one block between {START!r} and {END!r}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{START}\n{tables.read_text().strip()}\n{END}{tail}")


if __name__ == "__main__":
    # python -m fdpipe.stages.readme_tables [README.md [results/report/readme_tables.md]]
    import sys

    args = sys.argv[1:]
    splice(args[0] if args else "README.md", args[1] if len(args) > 1 else "results/report/readme_tables.md")
