"""Alignment stage: one f-DPG run on a language model.

Base ``a`` = the SFT model (frozen); the policy starts as a copy of it. The proxy reward is
the trained reward model (standardised with the mean and std of its held-out scores, so a
run's ``beta`` or ``threshold`` is in units of reward standard deviations); the gold reward
(VADER compound) is only reported. The loop itself is `fdpipe.fdpg.aligner.Aligner`.

Outputs: ``model/`` (HF ``save_pretrained``), ``metrics.parquet`` (one row per step, the
columns of `fdpipe.fdpg.aligner.STEP_METRICS`) and ``target.json`` (the target with its fitted
λ). Resumable state (the policy's trainable parameters, optimiser, Z estimates, RNG, metrics
so far; `fdpipe.training.checkpoint`) is kept in ``state_path`` beside the outputs and
removed after a successful run.
"""
from __future__ import annotations

import copy
import json
import logging
import math

import pandas as pd
import torch
from tqdm.auto import tqdm

from fdpipe.common.io import atomic_path, provenance, read_parquet, write_parquet
from fdpipe.common.runtime import pick_device, seed_everything, set_threads
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.models import causal_lm, gold
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.reward_model import RewardModel
from fdpipe.models.trainable import set_trainable
from fdpipe.training import checkpoint

log = logging.getLogger("fdpipe.align")


def _prompt_tokens(tokenizer, path) -> tuple[list, list[list[int]]]:
    prompts = read_parquet(path, required={"prompt_id": None, "prompt": "text"}, min_rows=1)
    tokens = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts["prompt"].tolist()]
    return prompts["prompt_id"].astype(str).tolist(), tokens


def run(*, sft_model, reward_model, prompts_path, run_name: str, run_cfg: dict, seed: int, out_model,
        out_metrics, out_target, state_path, device: str = "auto", threads: int | None = None) -> pd.DataFrame:
    """Train one f-DPG run and write its outputs; returns the per-step metrics."""
    key = f"alignment.runs.{run_name}"
    cfg = AlignConfig.from_config(run_cfg, key)
    target = Target.from_config(run_cfg.get("target") or {}, key=f"{key}.target")
    max_new_tokens = int(run_cfg.get("max_new_tokens", 24))
    train_layers = int(run_cfg.get("train_layers", -1))
    checkpoint_every = int(run_cfg.get("checkpoint_every", 10))
    set_threads(threads)
    dev = pick_device(device)
    seed_everything(seed)
    fingerprint = checkpoint.fingerprint({"run": run_name, **run_cfg}, seed, {
        "sft_model": sft_model, "reward_model": reward_model, "prompts": prompts_path})

    tokenizer = causal_lm.load_tokenizer(sft_model)
    base_model = causal_lm.load_causal_lm(sft_model, dev)
    for p in base_model.parameters():
        p.requires_grad_(False)
    policy_model = copy.deepcopy(base_model)
    n_train = sum(p.numel() for p in set_trainable(policy_model, train_layers, key=f"{key}.train_layers"))
    log.info("run %s: %s on %s, %d trainable parameters", run_name, cfg.divergence, target.describe(), n_train)
    policy = CausalPolicy.for_tokenizer(policy_model, tokenizer, max_new_tokens=max_new_tokens)
    base = CausalPolicy.for_tokenizer(base_model, tokenizer, max_new_tokens=max_new_tokens)

    scorer = RewardModel.load(reward_model, dev, normalize=True)
    reward_fn = lambda samples: scorer.score(samples.texts).to(dev)
    gold_fn = lambda samples: torch.from_numpy(gold.gold_reward(samples.texts))
    keys, tokens = _prompt_tokens(tokenizer, prompts_path)
    generator = torch.Generator(device=dev).manual_seed(seed)
    aligner = Aligner(policy, base, reward_fn, target, PromptCycle(keys, tokens, seed), cfg,
                      generator=generator, gold_fn=gold_fn)

    rows: list[dict] = []
    state = checkpoint.load_state(state_path, fingerprint)
    if state is not None:
        aligner.load_state_dict(state["aligner"], source=state_path)
        rows = list(state["metrics"])
        log.info("resumed %s at step %d", run_name, aligner.step_count)

    bar = tqdm(total=cfg.steps, initial=aligner.step_count, desc=f"align {run_name}", unit="step")
    while aligner.step_count < cfg.steps:
        metrics = aligner.step()
        rows.append(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", gold=f"{metrics.get('gold_mean', math.nan):.3f}",
                        kl=f"{metrics['kl_pi_a']:.3f}", obj=f"{metrics['objective']:.3g}")
        log.info("step %d %s", metrics["step"], " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                           if isinstance(v, float)))
        if aligner.step_count % checkpoint_every == 0 and aligner.step_count < cfg.steps:
            checkpoint.save_state(state_path, fingerprint, aligner=aligner.state_dict(), metrics=rows)
    bar.close()

    frame = pd.DataFrame(rows)
    frame.insert(0, "run", run_name)
    frame.insert(1, "divergence", cfg.divergence)
    frame.insert(2, "target", target.describe())
    meta = provenance({"run": run_name, **run_cfg}, seed, stage="align")
    target_info = {"kind": target.kind, "beta": target.beta, "threshold": target.threshold,
                   "epsilon": target.epsilon, "feature": target.feature, "moment": target.moment,
                   "lambda": target.lam, "reward_normalized": True}
    if aligner.lambda_fit is not None:
        target_info["lambda_fit"] = {"moment": aligner.lambda_fit.moment, "error": aligner.lambda_fit.error}
    causal_lm.save_causal_lm(policy_model, tokenizer, out_model)
    write_parquet(frame, out_metrics, meta)
    with atomic_path(out_target) as tmp:
        tmp.write_text(json.dumps(target_info, indent=2))
    checkpoint.remove_state(state_path)
    return frame
