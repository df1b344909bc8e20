"""The toy study: every divergence on every target kind, measured exactly.

Each run trains a `fdpipe.fdpg.toy.TabularLM` policy with the same `fdpipe.fdpg.aligner.Aligner`
the language-model stage uses, on one target kind of the enumerable `fdpipe.fdpg.toy.ToySpace`,
and records every ``eval_every`` steps the *exact* ``D_f(π‖p)`` for all six generators,
``KL(π‖a)``, the constraint ``E_π[φ]`` (``E_π[b]``, ``E_π[φ]`` or ``E_π[r]``), the entropy
of ``π`` and the Aligner's own sampled estimates (objective, ``log Z``). The learning rate
decays linearly to zero by default: ``tv``'s pseudo-reward ``−½ sign(log t)`` does not shrink
near the optimum, so a constant step size leaves the policy jittering around ``p``.

Outputs (see `COLUMNS`): ``curves.parquet``, one row per (target, divergence, seed, step),
and a figure (PNG and SVG) of the exact divergences against the step, one line per
generator. `run_part` trains a subset of the generators so that a workflow can spread the
runs over jobs; `run` merges parts (or trains everything) and writes the outputs.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from fdpipe.fdpg import divergences
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.common.config import known_keys
from fdpipe.common.errors import ConfigError
from fdpipe.common.io import atomic_path, provenance, read_parquet, write_parquet
from fdpipe.common.runtime import set_threads
from fdpipe.fdpg.targets import KINDS, Target
from fdpipe.fdpg.toy import ToyProblem, ToySpace, build_problem

log = logging.getLogger("fdpipe.toy_study")

COLUMNS = {
    "target": "target kind: rlhf, pointwise or distributional",
    "divergence": "generator f that the run minimised",
    "seed": "training seed (sampling and prompt order)",
    "step": "optimiser steps taken (0 = the policy equals the base a)",
    "objective": "exact D_f(π‖p) for the run's own generator",
    "objective_ratio": "objective divided by its value at step 0 (π = a)",
    **{f"exact_{name}": f"exact D_{name}(π‖p)" for name in divergences.NAMES},
    "kl_pi_a": "exact KL(π‖a)",
    "kl_p_a": "exact KL(p‖a) (constant: how far the target is from the base)",
    "constraint": "exact E_π[φ]: E_π[b] (pointwise), E_π[φ] (distributional), E_π[r] (rlhf)",
    "constraint_target": "exact E_p[φ], the value the constraint reaches at π = p",
    "reward_mean": "exact E_π[r]",
    "entropy": "exact entropy of π over whole completions (nats, mean over prompts)",
    "entropy_target": "exact entropy of p (nats, mean over prompts)",
    "log_z_exact": "exact log Z(c), mean over prompts",
    "log_z_estimate": "the Aligner's running log Z estimate at this step (NaN at step 0)",
    "objective_estimate": "the Aligner's importance-sampling estimate of D_f(π‖p) at this step (NaN at step 0)",
    "lambda": "λ of the distributional target (NaN otherwise)",
}


@dataclass
class ToyStudyConfig:
    """The ``toy`` section of the config (defaults and descriptions in the schema)."""

    num_content: int = 3
    num_prompts: int = 2
    max_length: int = 3
    init_scale: float = 1.0
    model_seed: int = 0
    reward_seed: int = 1
    seeds: int = 3
    divergences: list = field(default_factory=lambda: list(divergences.NAMES))
    targets: dict = field(default_factory=lambda: {
        "rlhf": {"beta": 1.0},
        "pointwise": {"threshold": 0.0, "epsilon": 0.01},
        "distributional": {"feature": "indicator", "threshold": 0.0, "moment": 0.9},
    })
    steps: int = 150
    eval_every: int = 5
    samples_per_prompt: int = 32
    lr: float = 0.1
    lr_schedule: str = "linear"
    baseline: str = "loo"
    proposal: str = "online"

    @classmethod
    def from_config(cls, cfg: dict | None, key: str = "toy") -> "ToyStudyConfig":
        out = cls(**copy.deepcopy(known_keys(cfg, cls.__dataclass_fields__, key)))
        for name in ("num_content", "num_prompts", "max_length", "seeds", "steps", "eval_every",
                     "samples_per_prompt"):
            if int(getattr(out, name)) < 1:
                raise ConfigError(f"{key}.{name}", "a positive integer", getattr(out, name))
        for name in out.divergences:
            if name not in divergences.NAMES:
                raise ConfigError(f"{key}.divergences", f"names from {', '.join(divergences.NAMES)}", name)
        for kind in out.targets:
            if kind not in KINDS:
                raise ConfigError(f"{key}.targets", f"keys from {', '.join(KINDS)}", kind)
        if out.lr_schedule not in ("constant", "linear"):
            raise ConfigError(f"{key}.lr_schedule", "constant or linear", out.lr_schedule)
        out.align_config("rkl", key)          # validates lr, baseline, proposal
        for kind in out.targets:
            out.target(kind, key)             # validates each target section
        return out

    def space(self) -> ToySpace:
        return ToySpace(self.num_content, self.num_prompts, self.max_length)

    def target(self, kind: str, key: str = "toy") -> Target:
        return Target.from_config({"kind": kind, **(self.targets.get(kind) or {})}, key=f"{key}.targets.{kind}")

    def align_config(self, divergence: str, key: str = "toy") -> AlignConfig:
        """One run's `AlignConfig`: every prompt at every step, no gradient clipping."""
        return AlignConfig.from_config({
            "divergence": divergence, "steps": self.steps, "prompts_per_step": self.num_prompts,
            "samples_per_prompt": self.samples_per_prompt, "lr": self.lr, "baseline": self.baseline,
            "proposal": self.proposal, "grad_clip": 0.0,
        }, key)

    def problem(self, kind: str) -> ToyProblem:
        return build_problem(self.space(), self.target(kind), model_seed=self.model_seed,
                             reward_seed=self.reward_seed, init_scale=self.init_scale)


def make_aligner(problem: ToyProblem, cfg: AlignConfig, seed: int) -> Aligner:
    """The alignment stage's `Aligner` over a toy problem (seeded prompt order and sampling)."""
    prompts = PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), seed)
    return Aligner(problem.policy, problem.base, problem.reward, problem.target, prompts, cfg,
                   generator=torch.Generator().manual_seed(seed), feature_fn=problem.features)


def linear_decay(aligner: Aligner, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate decaying linearly from its initial value to 0 after `steps` steps."""
    return torch.optim.lr_scheduler.LambdaLR(aligner.optimizer, lambda i: max(0.0, 1.0 - i / steps))


def train_run(problem: ToyProblem, cfg: AlignConfig, seed: int, *, eval_every: int, lr_schedule: str = "linear",
              labels: dict | None = None) -> pd.DataFrame:
    """Train ``problem.policy`` for ``cfg.steps`` steps; exact measurements every `eval_every` steps.

    Returns one row per measurement (step 0 included) with the columns of `COLUMNS`
    (`labels` adds constant columns such as target and divergence).
    """
    aligner = make_aligner(problem, cfg, seed)
    schedule = linear_decay(aligner, cfg.steps) if lr_schedule == "linear" else None
    rows, first, last = [], None, {}
    for step in range(cfg.steps + 1):
        if step > 0:
            last = aligner.step()
            if schedule is not None:
                schedule.step()
        if step % eval_every and step != cfg.steps:
            continue
        ex = problem.exact()
        objective = ex.divergences[cfg.divergence]
        first = objective if first is None else first
        rows.append({
            **(labels or {}), "seed": seed, "step": step,
            "objective": objective, "objective_ratio": objective / first if first > 0 else math.nan,
            **{f"exact_{name}": value for name, value in ex.divergences.items()},
            "kl_pi_a": ex.kl_pi_a, "kl_p_a": ex.kl_p_a,
            "constraint": ex.constraint, "constraint_target": ex.constraint_target,
            "reward_mean": ex.reward_mean, "entropy": ex.entropy, "entropy_target": ex.entropy_target,
            "log_z_exact": float(ex.log_z.mean()), "log_z_estimate": last.get("log_z", math.nan),
            "objective_estimate": last.get("objective", math.nan),
            "lambda": problem.target.lam if problem.target.lam is not None and not problem.target.over_features
            else math.nan,
            # a target over features: each feature's exact E_π[φ] and E_p[φ]
            **{f"feature_{name}": value for name, value in ex.features.items()},
            **{f"feature_{name}_target": value for name, value in ex.features_target.items()},
        })
    return pd.DataFrame(rows)


def train_all(cfg: ToyStudyConfig, seed: int, divergence_names=None) -> pd.DataFrame:
    """Every (target, divergence, seed) run of the study for the given generators."""
    frames = []
    for kind in cfg.targets:
        for name in divergence_names or cfg.divergences:
            for run_seed in range(seed, seed + cfg.seeds):
                start = time.perf_counter()
                problem = cfg.problem(kind)
                frame = train_run(problem, cfg.align_config(name), run_seed, eval_every=cfg.eval_every,
                                  lr_schedule=cfg.lr_schedule, labels={"target": kind, "divergence": name})
                frames.append(frame)
                final = frame.iloc[-1]
                log.info("%s %s seed %d: D_f %.4g -> %.4g (x%.3f) in %.1fs", kind, name, run_seed,
                         frame["objective"].iloc[0], final["objective"], final["objective_ratio"],
                         time.perf_counter() - start)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def run_part(cfg: dict, seed: int, divergence_names: list[str], out_part, *, threads: int = 1) -> pd.DataFrame:
    """Train the named generators on every target and seed; write their rows to `out_part`."""
    study = ToyStudyConfig.from_config(cfg)
    set_threads(threads)
    frame = train_all(study, seed, divergence_names)
    write_parquet(frame, out_part, provenance(cfg, seed, divergences=list(divergence_names)))
    return frame


def run(cfg: dict, seed: int, out_curves, out_plot, *, parts=None, threads: int = 1) -> pd.DataFrame:
    """Write ``curves.parquet`` and the figure (``out_plot`` PNG plus an SVG beside it).

    With `parts` (files written by `run_part`) their rows are merged; without, every run is
    trained here.
    """
    study = ToyStudyConfig.from_config(cfg)
    set_threads(threads)
    if parts:
        curves = pd.concat([read_parquet(p) for p in parts], ignore_index=True)
    else:
        curves = train_all(study, seed)
    order = {"target": list(study.targets), "divergence": list(study.divergences)}
    curves = curves.assign(**{k: pd.Categorical(curves[k], categories=v, ordered=True) for k, v in order.items()})
    curves = curves.sort_values(["target", "divergence", "seed", "step"]).reset_index(drop=True)
    curves = curves.assign(target=curves["target"].astype(str), divergence=curves["divergence"].astype(str))
    missing = [(k, d) for k in study.targets for d in study.divergences
               if not ((curves["target"] == k) & (curves["divergence"] == d)).any()]
    if missing:
        raise ValueError(f"toy study: no rows for (target, divergence) {missing[0]}; parts: {parts}")
    write_parquet(curves[[c for c in COLUMNS if c in curves.columns]], out_curves,
                  provenance(cfg, seed, columns=COLUMNS))
    plot(curves, out_plot)
    return curves


def summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Final-step means over seeds, plus the first step at which the objective is ≤ 10% of its start."""
    last = curves[curves["step"] == curves["step"].max()]
    cols = ["objective_ratio", "exact_tv", "exact_fkl", "kl_pi_a", "entropy", "entropy_target", "constraint",
            "constraint_target"]
    out = last.groupby(["target", "divergence"], sort=False)[cols].mean()
    reached = curves[curves["objective_ratio"] <= 0.1].groupby(["target", "divergence", "seed"], sort=False)["step"].min()
    out["step_to_10pct"] = reached.groupby(["target", "divergence"], sort=False).mean()
    return out.reset_index()


def plot(curves: pd.DataFrame, out_png) -> None:
    """Exact divergence against step, one line per generator (mean over seeds, band = min–max).

    Rows: the run's own ``D_f(π‖p)`` relative to its start (log scale), the exact total
    variation ``TV(π, p)`` (one yardstick for every run), and the entropy gap ``H(π) − H(p)``.
    Columns: target kinds. Writes `out_png` and the same figure as SVG beside it.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(curves["target"]))
    names = list(dict.fromkeys(curves["divergence"]))
    rows = [("objective_ratio", "own $D_f(\\pi\\|p)$ / value at $\\pi=a$", True),
            ("exact_tv", "TV$(\\pi, p)$ (exact)", False),
            ("entropy_gap", "$H(\\pi) - H(p)$ (nats)", False)]
    curves = curves.assign(entropy_gap=curves["entropy"] - curves["entropy_target"])
    colors = dict(zip(divergences.NAMES, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=(4.2 * len(kinds), 3.0 * len(rows)),
                             sharex=True, squeeze=False)
    for j, kind in enumerate(kinds):
        for i, (col, label, logy) in enumerate(rows):
            ax = axes[i][j]
            for name in names:
                sel = curves[(curves["target"] == kind) & (curves["divergence"] == name)]
                stats = sel.groupby("step")[col].agg(["mean", "min", "max"])
                ax.plot(stats.index, stats["mean"], color=colors.get(name), label=name, lw=1.5)
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colors.get(name), alpha=0.15, lw=0)
            if logy:
                ax.set_yscale("log")
                ax.axhline(0.1, color="grey", ls=":", lw=1)
            if col == "entropy_gap":
                ax.axhline(0.0, color="grey", ls=":", lw=1)
            if i == 0:
                ax.set_title(kind)
            if i == len(rows) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel(label)
    axes[0][-1].legend(title="generator", fontsize=8, loc="upper right")
    seeds = curves["seed"].nunique()
    fig.suptitle(f"f-DPG on the exact toy space: mean over {seeds} seeds (band: min–max)", fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    with atomic_path(out_png.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg")
    plt.close(fig)
