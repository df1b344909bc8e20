"""Alignment stage: one f-DPG run on a language model.

Base ``a`` = the SFT model (frozen); the policy starts as a copy of it. The proxy reward is
the trained reward model (standardised with the mean and std of its held-out scores, so a
run's ``beta`` or ``threshold`` is in units of reward standard deviations); the gold reward
(VADER compound) is only reported. The loop itself is `fdpipe.alignment.Aligner`.

Outputs: ``model/`` (HF ``save_pretrained``), ``metrics.parquet`` (one row per step, the
columns of `fdpipe.alignment.STEP_METRICS`) and ``target.json`` (the target with its fitted
λ). Resumable state (policy, optimiser, Z estimates, RNG, metrics so far) is kept in
``state_path`` beside the outputs and removed after a successful run.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from fdpipe.models import causal_lm, gold
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.common.errors import DataError
from fdpipe.common.io import atomic_path, provenance, read_parquet, write_parquet
from fdpipe.models.policy import CausalPolicy
from fdpipe.stages.reward import RewardModel
from fdpipe.common.runtime import pick_device, seed_everything, set_threads
from fdpipe.stages.sft import set_trainable
from fdpipe.fdpg.targets import Target

log = logging.getLogger("fdpipe.align")


def _prompt_tokens(tokenizer, path) -> tuple[list, list[list[int]]]:
    prompts = read_parquet(path, required=("prompt_id", "prompt"))
    if prompts.empty:
        raise DataError(path, "no prompts")
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

    tokenizer = causal_lm.load_tokenizer(sft_model)
    base_model = causal_lm.load_causal_lm(sft_model, dev)
    for p in base_model.parameters():
        p.requires_grad_(False)
    policy_model = copy.deepcopy(base_model)
    n_train = sum(p.numel() for p in set_trainable(policy_model, train_layers, key=f"{key}.train_layers"))
    log.info("run %s: %s on %s, %d trainable parameters", run_name, cfg.divergence, target.describe(), n_train)
    make = lambda m: CausalPolicy(m, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  max_new_tokens=max_new_tokens, tokenizer=tokenizer)
    policy, base = make(policy_model), make(base_model)

    scorer = RewardModel.load(reward_model, dev, normalize=True)
    reward_fn = lambda samples: scorer.score(samples.texts).to(dev)
    gold_fn = lambda samples: torch.from_numpy(gold.gold_reward(samples.texts))
    keys, tokens = _prompt_tokens(tokenizer, prompts_path)
    generator = torch.Generator(device=dev).manual_seed(seed)
    aligner = Aligner(policy, base, reward_fn, target, PromptCycle(keys, tokens, seed), cfg,
                      generator=generator, gold_fn=gold_fn)

    rows: list[dict] = []
    state_path = Path(state_path)
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location=dev, weights_only=False)
            aligner.load_state_dict(state["aligner"])
            rows = state["metrics"]
        except Exception as exc:
            raise DataError(state_path, f"corrupt resume state ({type(exc).__name__}); delete it to restart") from None
        log.info("resumed %s at step %d from %s", run_name, aligner.step_count, state_path)

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
            with atomic_path(state_path) as tmp:
                torch.save({"aligner": aligner.state_dict(), "metrics": rows}, tmp)
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
    state_path.unlink(missing_ok=True)
    return frame
