"""Report stage: one tidy table of every evaluation, one of every training curve, and plots.

Outputs of `run`:

* ``summary.parquet``: all ``results/eval/{policy}/summary.parquet`` tables concatenated
  (columns of `fdpipe.common.tables.SUMMARY_COLUMNS`);
* ``curves.parquet``: every alignment run's per-step metrics in long form
  (``run, divergence, target, step, metric, value``; NaN values — metrics a run does not
  record, such as λ of a non-distributional target — are left out);
* ``frontier.{png,svg}``: gold and proxy reward against ``KL(π‖SFT)`` per policy, with intervals;
* ``curves.{png,svg}``: training curves per run, coloured by divergence;
* ``features.{png,svg}``: for targets written over named features, each feature's ``E[φ]``
  per policy on held-out prompts (with the requested moments) and during training.

Each table carries the provenance metadata of `fdpipe.common.io.provenance` plus the config hash
and path of every input it was built from (``sources``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from fdpipe.common import plots
from fdpipe.common.config import known_keys
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import provenance, read_metadata, read_parquet, write_parquet
from fdpipe.common.tables import FEATURE_SUMMARY_COLUMNS, SUMMARY_COLUMNS, summary_columns

log = logging.getLogger("fdpipe.report")

CURVE_ID_COLUMNS = ("run", "divergence", "target", "step")
CURVE_COLUMNS = {
    "run": "alignment run name",
    "divergence": "the run's f-divergence",
    "target": "the run's target description",
    "step": "optimizer step (1-based)",
    "metric": "training metric name (see fdpipe.fdpg.metrics.STEP_METRICS)",
    "value": "its value at that step",
}


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The ``report`` config section. Defaults equal those of the config schema."""

    curve_metrics: tuple = ("reward_mean", "gold_mean", "kl_pi_a", "objective")
    frontier_metrics: tuple = ("gold_mean", "reward_mean")
    smoothing: int = 5   # centred moving-average window of the curves plot (1: none)
    dpi: int = 150

    @classmethod
    def from_dict(cls, cfg: dict | None, key: str = "report") -> "ReportConfig":
        cfg = known_keys(cfg, [f.name for f in dataclasses.fields(cls)], key)
        for name in ("curve_metrics", "frontier_metrics"):
            if name in cfg:
                value = cfg[name]
                if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{key}.{name}", "a non-empty list of metric names", value)
                cfg[name] = tuple(value)
        out = cls(**cfg)
        for name in ("smoothing", "dpi"):
            value = getattr(out, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}.{name}", "a positive integer", value)
        return out


def _config_hash(path) -> str | None:
    try:
        return read_metadata(path).get("config_hash")
    except Exception:  # metadata is informative only; an unreadable file already failed to load
        return None


def read_summaries(paths) -> pd.DataFrame:
    """Concatenate evaluation summaries; every file must have the summary columns."""
    paths = list(paths)
    if not paths:
        raise ValueError("the report needs at least one evaluation summary")
    frames, extra = [], []
    for path in paths:
        df = read_parquet(path, required=list(SUMMARY_COLUMNS))
        present = [c for c in FEATURE_SUMMARY_COLUMNS if c in df.columns]
        extra += [c for c in present if c not in extra]
        frames.append(df[list(SUMMARY_COLUMNS) + present])
    out = pd.concat(frames, ignore_index=True)
    out = out[list(SUMMARY_COLUMNS) + [c for c in FEATURE_SUMMARY_COLUMNS if c in extra]]
    key = ["policy", "run", "metric"]
    duplicated = out.duplicated(key, keep=False)
    if duplicated.any():
        first = out[duplicated].iloc[0]
        raise DataError(paths[0], f"metric {first['metric']!r} of policy {first['policy']!r} for run "
                                  f"{first['run']!r} appears in more than one summary")
    for col in ("policy", "run", "divergence", "target", "metric"):
        out[col] = out[col].astype("string")
    out["n"] = out["n"].astype("int64")
    for col in extra:
        out[col] = out[col].astype("float64")
    return out.sort_values(key, kind="stable").reset_index(drop=True)


def read_curves(paths) -> pd.DataFrame:
    """Per-step metrics of every run (one row per step and metric column), NaN values dropped."""
    frames = []
    for path in paths:
        df = read_parquet(path, required=CURVE_ID_COLUMNS)
        values = [c for c in df.columns
                  if c not in CURVE_ID_COLUMNS and pd.api.types.is_numeric_dtype(df[c])
                  and not pd.api.types.is_bool_dtype(df[c])]
        long = df.melt(id_vars=list(CURVE_ID_COLUMNS), value_vars=values, var_name="metric", value_name="value")
        frames.append(long)
    if not frames:
        out = pd.DataFrame({c: pd.Series(dtype="float64" if c == "value" else "string") for c in CURVE_COLUMNS})
    else:
        out = pd.concat(frames, ignore_index=True)
    out = out[list(CURVE_COLUMNS)].dropna(subset=["value"])
    for col in ("run", "divergence", "target", "metric"):
        out[col] = out[col].astype("string")
    out["step"] = out["step"].astype("int64")
    out["value"] = out["value"].astype("float64")
    return out.sort_values(["run", "metric", "step"], kind="stable").reset_index(drop=True)


def run(summary_paths, metrics_paths, summary_out, curves_out, frontier_png, frontier_svg, curves_png,
        curves_svg, cfg: dict | None = None, *, features_png=None, features_svg=None, config=None,
        seed: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the report tables and plots (see the module docstring); returns (summary, curves).

    `cfg` is the ``report`` config section; `config` is what the outputs' config hash covers
    (defaults to the report section); `seed` is recorded in the metadata. The features figure
    is drawn when `features_png` and `features_svg` are given.
    """
    report_cfg = ReportConfig.from_dict(cfg)
    summary_paths, metrics_paths = [Path(p) for p in summary_paths], [Path(p) for p in metrics_paths]
    summary = read_summaries(summary_paths)
    curves = read_curves(metrics_paths)
    sources = {str(p): _config_hash(p) for p in summary_paths + metrics_paths}
    meta = provenance(config if config is not None else dataclasses.asdict(report_cfg), seed, stage="report",
                      sources=sources)
    write_parquet(summary, summary_out, {**meta, "columns": summary_columns(summary)})
    write_parquet(curves, curves_out, {**meta, "columns": CURVE_COLUMNS})
    plots.frontier(summary, frontier_png, frontier_svg, y_metrics=report_cfg.frontier_metrics, dpi=report_cfg.dpi)
    plots.curves(curves, curves_png, curves_svg, metrics=report_cfg.curve_metrics,
                 smoothing=report_cfg.smoothing, dpi=report_cfg.dpi)
    if features_png is not None and features_svg is not None:
        plots.features(summary, curves, features_png, features_svg, smoothing=report_cfg.smoothing,
                       dpi=report_cfg.dpi)
    log.info("report: %d summary rows from %d policies, %d curve points from %d runs",
             len(summary), summary["policy"].nunique(), len(curves), curves["run"].nunique())
    return summary, curves
