"""Columns of the evaluation tables, shared by the stages that write and read them.

`samples.parquet` and `summary.parquet` of the evaluate stage, and the report's summary,
use these column names and descriptions (stored in each file's metadata under ``columns``).
"""
from __future__ import annotations

import math

import pandas as pd

SAMPLE_COLUMNS = {
    "policy": "policy that generated the sample: `sft` or an alignment run name",
    "prompt_id": "id of the held-out prompt (from prompts_eval.parquet)",
    "sample": "index of the sample among those of its prompt (0-based)",
    "prompt": "prompt text",
    "completion": "generated continuation, decoded, EOS removed",
    "text": "prompt + completion decoded together: what the reward model and VADER score",
    "length": "completion length in tokens (EOS included when generated)",
    "logp_policy": "log π(completion | prompt) under the policy (sum over completion tokens)",
    "logp_sft": "log a(completion | prompt) under the SFT model",
    "entropy": "sum over completion tokens of the policy's per-token entropy (nats)",
    "reward": "proxy reward of `text`, standardized: (raw − mean) / std with the reward model's reward_stats.json (the scale alignment trains on)",
    "reward_raw": "raw reward-model score of `text`",
    "gold": "gold reward: VADER compound score of `text`, in [-1, 1]",
}

SUMMARY_COLUMNS = {
    "policy": "`sft` or an alignment run name: whose samples the row is computed from",
    "run": "`sft` for the SFT model's own metrics, else the alignment run whose target the row refers to",
    "divergence": "the run's f-divergence (null for the SFT model's own metrics)",
    "target": "the run's target description (null for the SFT model's own metrics)",
    "metric": "metric name (see the metric table)",
    "value": "estimate",
    "ci_low": "lower end of the interval (null where there is none)",
    "ci_high": "upper end of the interval (null where there is none)",
    "n": "number of samples the estimate uses",
}


# Columns of a summary that has feature rows (metric `feature_<name>`), after those above.
FEATURE_SUMMARY_COLUMNS = {
    "requested": "requested moment E_p[φ] of a `feature_<name>` row whose feature has a moment in the run's "
                 "distributional target (null on every other row); present only in tables with feature rows",
}

# A column of samples.parquet per feature of an aligned run's target (after those above).
FEATURE_SAMPLE_COLUMN = "feature value φ_{name}(x) of the sample (1/0 for a binary feature)"


def summary_row(policy, run, divergence, target, metric, value, low=math.nan, high=math.nan, n=0) -> dict:
    """One row of a summary table (see SUMMARY_COLUMNS); NaN bounds where there is no interval."""
    return {"policy": policy, "run": run, "divergence": divergence, "target": target, "metric": metric,
            "value": float(value), "ci_low": float(low), "ci_high": float(high), "n": int(n)}


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """Summary rows as a frame with the columns and dtypes of SUMMARY_COLUMNS (and
    FEATURE_SUMMARY_COLUMNS when a row has them)."""
    extra = [c for c in FEATURE_SUMMARY_COLUMNS if any(c in row for row in rows)]
    df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS) + extra)
    for col in ("policy", "run", "divergence", "target", "metric"):
        df[col] = df[col].astype("string")
    df["n"] = df["n"].astype("int64")
    for col in extra:
        df[col] = df[col].astype("float64")
    return df


def summary_columns(frame: pd.DataFrame) -> dict:
    """Descriptions of the columns of a summary table (what its metadata's ``columns`` holds)."""
    described = {**SUMMARY_COLUMNS, **FEATURE_SUMMARY_COLUMNS}
    return {c: described[c] for c in frame.columns if c in described}
