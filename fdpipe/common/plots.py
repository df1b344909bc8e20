"""Pictures beside the report tables: the reward–KL frontier, training curves and features.

Each function takes the tidy tables of `fdpipe.stages.report` and saves one figure as PNG and SVG
(matplotlib's Agg backend, no display needed), each written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fdpipe.common.io import atomic_path

# One fixed colour per divergence, so every figure of a report agrees.
DIVERGENCE_COLORS = {"rkl": "tab:blue", "fkl": "tab:orange", "js": "tab:green", "tv": "tab:red",
                     "chi2": "tab:purple", "rchi2": "tab:brown"}
OTHER_COLOR = "tab:gray"

METRIC_LABELS = {
    "reward_mean": "proxy reward (standardized)",
    "gold_mean": "gold reward (VADER compound)",
    "kl_pi_sft": "KL(π‖SFT) (nats)",
    "kl_pi_a": "KL(π‖a) (nats)",
    "objective": "objective D_f(π‖p)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def color_of(divergence) -> str:
    return DIVERGENCE_COLORS.get(divergence, OTHER_COLOR)


def label_of(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def save_figure(fig, png_path, svg_path, dpi: int = 150) -> None:
    """Save `fig` to both paths atomically and close it."""
    plt = _pyplot()
    try:
        for path, fmt in ((png_path, "png"), (svg_path, "svg")):
            with atomic_path(Path(path)) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def _point(table: pd.DataFrame, metric: str):
    """(value, lower error, upper error) of `metric` in a one-policy slice of the summary."""
    rows = table[table["metric"] == metric]
    if rows.empty:
        return math.nan, 0.0, 0.0
    row = rows.iloc[0]
    value, low, high = float(row["value"]), float(row["ci_low"]), float(row["ci_high"])
    lower = value - low if math.isfinite(low) else 0.0
    upper = high - value if math.isfinite(high) else 0.0
    return value, max(lower, 0.0), max(upper, 0.0)


def frontier(summary: pd.DataFrame, png_path, svg_path, *, x_metric: str = "kl_pi_sft",
             y_metrics=("gold_mean", "reward_mean"), dpi: int = 150) -> None:
    """Reward against KL(π‖SFT): one panel per y metric, one point per policy with its intervals.

    Aligned policies are coloured by divergence and labelled with their run name; the SFT
    model (its own rows, ``policy == run == 'sft'``) is the black star at KL = 0.
    """
    plt = _pyplot()
    own = summary[summary["policy"] == summary["run"]]
    fig, axes = plt.subplots(1, len(y_metrics), figsize=(5.2 * len(y_metrics), 4.2), squeeze=False)
    for ax, y_metric in zip(axes[0], y_metrics):
        seen = set()
        for policy, table in own.groupby("policy", sort=True):
            x, xl, xh = _point(table, x_metric)
            y, yl, yh = _point(table, y_metric)
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            if policy == "sft":
                ax.errorbar([x], [y], yerr=[[yl], [yh]], fmt="*", color="black", markersize=12,
                            capsize=3, label="SFT", zorder=3)
                continue
            divergence = table["divergence"].dropna().iloc[0] if table["divergence"].notna().any() else None
            label = divergence if divergence not in seen else None
            seen.add(divergence)
            ax.errorbar([x], [y], xerr=[[xl], [xh]], yerr=[[yl], [yh]], fmt="o", color=color_of(divergence),
                        capsize=3, label=label, zorder=2)
            ax.annotate(policy, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label_of(x_metric))
        ax.set_ylabel(label_of(y_metric))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="divergence", title_fontsize=8)
    fig.suptitle("Reward–KL frontier on held-out prompts (95% intervals)")
    save_figure(fig, png_path, svg_path, dpi)


def curves(long: pd.DataFrame, png_path, svg_path, *, metrics=("reward_mean", "gold_mean", "kl_pi_a", "objective"),
           smoothing: int = 1, dpi: int = 150) -> None:
    """Training curves: one panel per metric, one line per run coloured by its divergence.

    With ``smoothing > 1`` the raw values are drawn faintly and a centred moving average over
    that many steps on top (centred, so the smoothed curve does not lag the raw one).
    """
    plt = _pyplot()
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, metric in zip(flat, metrics):
        data = long[long["metric"] == metric]
        for run, table in data.groupby("run", sort=True):
            table = table.sort_values("step")
            divergence = table["divergence"].iloc[0]
            color = color_of(divergence)
            label = f"{run} ({divergence})"
            if smoothing > 1:
                ax.plot(table["step"], table["value"], color=color, alpha=0.25, linewidth=0.8)
                smooth = table["value"].rolling(smoothing, center=True, min_periods=1).mean()
                ax.plot(table["step"], smooth, color=color, linewidth=1.6, label=label)
            else:
                ax.plot(table["step"], table["value"], color=color, linewidth=1.4, label=label)
        ax.set_title(label_of(metric), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if data.empty:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in flat[len(metrics):]:
        ax.set_visible(False)
    handles, labels = flat[0].get_legend_handles_labels()
    for ax in flat[1:len(metrics)]:
        more_h, more_l = ax.get_legend_handles_labels()
        for h, lab in zip(more_h, more_l):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 4)))
    fig.suptitle("Training curves per run")
    fig.tight_layout()
    save_figure(fig, png_path, svg_path, dpi)


def _requested(rows: pd.DataFrame) -> float:
    """The requested moment of a feature's rows (NaN when there is none)."""
    if "requested" not in rows.columns or rows.empty:
        return math.nan
    values = rows["requested"].dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def features(summary: pd.DataFrame, long: pd.DataFrame, png_path, svg_path, *, smoothing: int = 1,
             dpi: int = 150) -> None:
    """Every feature of the targets written over features (summary rows ``feature_<name>``).

    Top row, one panel per feature: ``E[φ]`` on held-out prompts for the SFT model (black
    star) and for each run whose target uses the feature (coloured by divergence), with their
    intervals; a red bar marks the moment the run requested (none for a pointwise condition).
    Bottom row: the feature's mean over each run's training samples per step, the requested
    moment dashed. Without any feature, one panel says so.
    """
    plt = _pyplot()
    rows = summary[summary["metric"].astype(str).str.startswith("feature_")]
    names = sorted(set(rows["metric"].astype(str).str[len("feature_"):]))
    if not names:
        fig, ax = plt.subplots(figsize=(5.2, 2.0))
        ax.text(0.5, 0.5, "no run's target is written over features", ha="center", va="center", color="gray")
        ax.set_axis_off()
        save_figure(fig, png_path, svg_path, dpi)
        return
    fig, axes = plt.subplots(2, len(names), figsize=(4.8 * len(names), 7.6), squeeze=False)
    for j, name in enumerate(names):
        metric = f"feature_{name}"
        sel = rows[rows["metric"] == metric]
        runs = sorted(set(sel["run"]) - {"sft"})
        ax = axes[0][j]
        sft = sel[sel["policy"] == "sft"]
        if not sft.empty:
            y, low, high = _point(sft, metric)
            ax.errorbar([0], [y], yerr=[[low], [high]], fmt="*", color="black", markersize=12, capsize=3)
        marked = False
        for i, run in enumerate(runs, start=1):
            own = sel[(sel["policy"] == run) & (sel["run"] == run)]
            y, low, high = _point(own, metric)
            divergence = own["divergence"].dropna().iloc[0] if own["divergence"].notna().any() else None
            ax.errorbar([i], [y], yerr=[[low], [high]], fmt="o", color=color_of(divergence), capsize=3)
            requested = _requested(own)
            if math.isfinite(requested):
                ax.plot([i - 0.3, i + 0.3], [requested, requested], color="red", linewidth=2.2,
                        label=None if marked else "requested")
                marked = True
        ax.set_xticks(range(len(runs) + 1))
        ax.set_xticklabels(["SFT"] + runs, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(runs) + 0.6)
        ax.set_title(f"E[{name}] on held-out prompts", fontsize=10)
        ax.grid(alpha=0.3)
        if marked:
            ax.legend(fontsize=8)
        ax = axes[1][j]
        for run, table in long[long["metric"] == metric].groupby("run", sort=True):
            table = table.sort_values("step")
            color = color_of(table["divergence"].iloc[0])
            values = table["value"].rolling(smoothing, center=True, min_periods=1).mean() if smoothing > 1 \
                else table["value"]
            ax.plot(table["step"], values, color=color, linewidth=1.5, label=run)
            requested = _requested(sel[(sel["policy"] == run) & (sel["run"] == run)])
            if math.isfinite(requested):
                ax.axhline(requested, color=color, linestyle="--", linewidth=1)
        ax.set_title(f"E_π[{name}] while training (dashed: requested)", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Features of the targets: E[φ] per policy (intervals) and during training")
    fig.tight_layout()
    save_figure(fig, png_path, svg_path, dpi)
