"""Alignment throughput benchmark: samples per second and seconds per phase of one f-DPG step.

One configuration (causal LM, trainable last blocks, prompts × samples per step, new tokens,
KL coefficient β of an rlhf target) is timed in one process, in up to three ways:

* ``fdpipe`` — `fdpipe.fdpg.aligner.Aligner` as the align stage runs it: one prefill per
  prompt, the frozen trunk recorded while sampling and shared by the base's scoring and the
  policy's training forward;
* ``fdpipe_full`` — the same step with full forwards and a prefill per sample (what the
  stage did before the shared trunk), for the before/after ratio;
* ``trl_rloo`` — TRL's ``RLOOTrainer`` on the same model, trainable parameters, batch, new
  tokens, KL coefficient and sampling settings (temperature 1, no top-k/top-p, no gradient
  checkpointing) with the same reward model; skipped with a message when ``trl`` is not
  installed (``pip install -e ".[bench]"``). See `fdpipe.fdpg.trl_rloo`.

Each way runs ``warmup`` steps, then ``steps`` timed steps; the table has one row per way and
phase (``sample``, ``score``, ``train``, ``step``: mean seconds per step) plus ``samples_per_s``
(samples of a step / mean step seconds), with the configuration, the machine and its load.
Run it with ``python -m fdpipe.stages.align_bench --model <dir>`` or ``snakemake --cores all
benchmark_align``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import platform
import time

import numpy as np
import pandas as pd
import torch

from fdpipe.common.io import atomic_path, code_version, provenance, read_parquet, write_parquet
from fdpipe.common.runtime import seed_everything, set_threads
from fdpipe.fdpg import trl_rloo
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.models import causal_lm
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.reward_model import RewardModel, load_backbone
from fdpipe.models.trainable import set_trainable
from fdpipe.models.trunk import TrunkSplit

log = logging.getLogger("fdpipe.align_bench")

DEFAULTS = {"train_layers": 2, "prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 12,
            "beta": 0.1, "lr": 3.0e-4, "steps": 5, "warmup": 1, "ways": ["fdpipe", "fdpipe_full", "trl_rloo"]}
PHASES = ("sample", "score", "train", "step")


def settings(cfg: dict | None) -> dict:
    out = {**DEFAULTS, **(cfg or {})}
    unknown = set(out) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown benchmark settings: {sorted(unknown)}")
    return out


def _reward(reward_path, backbone: str) -> RewardModel:
    """The trained reward model when given, else the untrained backbone with a scalar head (the
    same computation, only the values differ)."""
    if reward_path:
        return RewardModel.load(reward_path, "cpu", normalize=True)
    model, tokenizer = load_backbone(backbone)
    return RewardModel(model.eval(), tokenizer, max_length=128)


def _prompts(tokenizer, prompts_path, n: int):
    frame = read_parquet(prompts_path, required={"prompt": "text"}, min_rows=1)
    texts = frame["prompt"].astype(str).tolist()[: max(n, 1)]
    return texts, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def time_fdpipe(model_path, scorer: RewardModel, prompt_texts, prompt_tokens, cfg: dict, seed: int,
                shared: bool) -> dict[str, list[float]]:
    """Per-step seconds of each phase of the Aligner (shared trunk and prefill, or full forwards)."""
    seed_everything(seed)
    tokenizer = causal_lm.load_tokenizer(model_path)
    base_model = causal_lm.load_causal_lm(model_path, "cpu")
    for p in base_model.parameters():
        p.requires_grad_(False)
    policy_model = copy.deepcopy(base_model)
    set_trainable(policy_model, cfg["train_layers"], key="train_layers")
    trunk = TrunkSplit.of(base_model, cfg["train_layers"]) if shared else None
    make = lambda m: CausalPolicy.for_tokenizer(m, tokenizer, max_new_tokens=cfg["max_new_tokens"], trunk=trunk)
    policy, base = make(policy_model), make(base_model)
    policy.share_prefill = base.share_prefill = shared
    acfg = AlignConfig(divergence="rkl", steps=cfg["steps"] + cfg["warmup"], prompts_per_step=cfg["prompts_per_step"],
                       samples_per_prompt=cfg["samples_per_prompt"], lr=cfg["lr"], token_kl=False)
    target = Target.from_config({"kind": "rlhf", "beta": cfg["beta"]}, key="bench.target")
    reward_fn = lambda s: scorer.score(s.texts)
    aligner = Aligner(policy, base, reward_fn, target, PromptCycle(prompt_texts, prompt_tokens, seed), acfg,
                      generator=torch.Generator().manual_seed(seed))
    times = {phase: [] for phase in PHASES}
    times["logprob_gap"] = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        m = aligner.step()
        times["logprob_gap"].append(m["logprob_gap"])
        if i >= cfg["warmup"]:
            for phase in PHASES:
                times[phase].append(m[f"time_{phase}_s"])
    return times


def machine_facts(threads: int | None) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
            "threads": int(threads or torch.get_num_threads()), "load_1m": load[0], "load_5m": load[1],
            "commit": code_version(), "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "trl": trl_rloo.version()}


def run(*, model_path, prompts_path, out_table, out_markdown, cfg: dict | None = None, reward_path=None,
        reward_backbone: str = "embedded", seed: int = 0, threads: int | None = None) -> pd.DataFrame:
    """Time every way of `cfg["ways"]` and write the Parquet table and the Markdown page."""
    cfg = settings(cfg)
    set_threads(threads)
    scorer = _reward(reward_path, reward_backbone)
    tokenizer = causal_lm.load_tokenizer(model_path)
    texts, tokens = _prompts(tokenizer, prompts_path, cfg["prompts_per_step"] * (cfg["warmup"] + cfg["steps"]))
    batch = cfg["prompts_per_step"] * cfg["samples_per_prompt"]
    rows, notes = [], []
    for way in cfg["ways"]:
        t0 = time.perf_counter()
        if way in ("fdpipe", "fdpipe_full"):
            times = time_fdpipe(model_path, scorer, texts, tokens, cfg, seed, shared=way == "fdpipe")
        elif way == "trl_rloo":
            times, note = trl_rloo.time_steps(model_path, scorer, texts, cfg, seed)
            if times is None:
                notes.append(note)
                log.warning("%s", note)
                continue
            if note:
                notes.append(note)
        else:
            raise ValueError(f"unknown way {way!r} (fdpipe, fdpipe_full, trl_rloo)")
        log.info("%s: %d steps in %.1f s; per timed step %s", way, cfg["warmup"] + cfg["steps"],
                 time.perf_counter() - t0, {k: round(float(np.mean(v)), 3) for k, v in times.items() if v})
        for phase in PHASES:
            values = times.get(phase) or []
            rows.append({"way": way, "metric": f"{phase}_s", "value": float(np.mean(values)) if values else np.nan,
                         "sd": float(np.std(values)) if values else np.nan, "steps": len(values)})
        if times.get("logprob_gap"):   # largest |log π sampled − log π trained| over every step
            rows.append({"way": way, "metric": "logprob_gap", "value": float(np.max(times["logprob_gap"])),
                         "sd": np.nan, "steps": len(times["logprob_gap"])})
        step = float(np.mean(times["step"]))
        rows.append({"way": way, "metric": "samples_per_s", "value": batch / step, "sd": np.nan,
                     "steps": len(times["step"])})
    facts = machine_facts(threads)
    table = pd.DataFrame(rows, columns=["way", "metric", "value", "sd", "steps"])
    for key in ("train_layers", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "beta"):
        table[key] = cfg[key]
    table["model"] = str(model_path)
    for key in ("machine", "threads", "load_1m", "commit", "date_utc"):
        table[key] = facts[key]
    write_parquet(table, out_table, provenance(cfg, seed, stage="align_bench", facts=facts, notes=notes))
    with atomic_path(out_markdown) as tmp:
        tmp.write_text(markdown(table, cfg, facts, notes))
    return table


def ratio(table: pd.DataFrame, way: str, other: str) -> float:
    """samples/s of `way` over that of `other` (NaN when either is missing)."""
    rate = table[table["metric"] == "samples_per_s"].set_index("way")["value"]
    return float(rate[way] / rate[other]) if way in rate and other in rate else float("nan")


def markdown(table: pd.DataFrame, cfg: dict, facts: dict, notes: list[str]) -> str:
    batch = cfg["prompts_per_step"] * cfg["samples_per_prompt"]
    lines = ["# Alignment throughput", "",
             f"- model: `{table['model'].iloc[0] if len(table) else ''}`, last {cfg['train_layers']} blocks train; "
             f"{cfg['prompts_per_step']} prompts × {cfg['samples_per_prompt']} samples = {batch} samples per step, "
             f"{cfg['max_new_tokens']} new tokens, β = {cfg['beta']}, temperature 1, no top-k/top-p",
             f"- {cfg['steps']} timed steps after {cfg['warmup']} warm-up step(s), means per step",
             f"- commit {facts['commit']}, {facts['date_utc']} UTC, {facts['machine']}, {facts['threads']} thread(s), "
             f"load average {facts['load_1m']:.2f} (1 min) / {facts['load_5m']:.2f} (5 min)",
             f"- torch {facts['torch']}, trl {facts['trl'] or 'not installed'}", "",
             "| way | samples/s | step s | sample s | score s | train s | log-prob gap |",
             "|---|---|---|---|---|---|---|"]
    for way, part in table.groupby("way", sort=False):
        val = part.set_index("metric")["value"]
        gap = f"{val['logprob_gap']:.2e}" if "logprob_gap" in val else "–"
        lines.append(f"| {way} | {val['samples_per_s']:.2f} | {val['step_s']:.3f} | {val['sample_s']:.3f} | "
                     f"{val['score_s']:.3f} | {val['train_s']:.3f} | {gap} |")
    lines.append("")
    for way, other in (("fdpipe", "fdpipe_full"), ("fdpipe", "trl_rloo")):
        r = ratio(table, way, other)
        if r == r:
            lines.append(f"- {way} / {other} samples/s: **{r:.2f}×**")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fdpipe.stages.align_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="causal LM folder (e.g. results/sft/model)")
    parser.add_argument("--prompts", default="results/data/prompts_train.parquet")
    parser.add_argument("--reward", default=None, help="reward model folder (default: untrained embedded backbone)")
    parser.add_argument("--out", default="results/bench/align.parquet")
    parser.add_argument("--markdown", default="results/bench/align.md")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    for key, value in DEFAULTS.items():
        if key != "ways":
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--ways", default=",".join(DEFAULTS["ways"]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = {key: getattr(args, key) for key in DEFAULTS if key != "ways"}
    cfg["ways"] = [w for w in args.ways.split(",") if w]
    run(model_path=args.model, prompts_path=args.prompts, out_table=args.out, out_markdown=args.markdown, cfg=cfg,
        reward_path=args.reward, seed=args.seed, threads=args.threads)
    print(open(args.markdown).read())


if __name__ == "__main__":
    main()
