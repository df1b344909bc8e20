"""Alignment stage: one f-DPG run on a language model.

Base ``a`` = the SFT model (frozen); the policy starts as a copy of it, or, with
``train.mode: lora``, is the same model with LoRA adapters, the base being that model with its
adapters disabled (`fdpipe.models.lora.policy_and_base`: one copy of the weights).
``precision`` and ``micro_batch_size`` (sampling, scoring and the training forward/backward in
micro-batches) go to the policies and the `Aligner`. The proxy reward is
the trained reward model (standardised with the mean and std of its held-out scores, so a
run's ``beta`` or ``threshold`` is in units of reward standard deviations); the gold reward
(VADER compound) is only reported. The loop itself is `fdpipe.fdpg.aligner.Aligner`.

A target written over named features (``target.features``, defined in ``alignment.features``
and brought into the run's config under ``features`` by
`fdpipe.common.config.merged_run_config`) has them computed once per sample by a
`fdpipe.fdpg.features.FeatureScorer` on the decoded texts.

Outputs: ``model/`` (HF ``save_pretrained``), ``metrics.parquet`` (one row per step, the
columns of `fdpipe.fdpg.metrics.STEP_METRICS`, plus `fdpipe.fdpg.metrics.FEATURE_METRICS` for a
target over features) and ``target.json`` (the target with its fitted λ and, over features,
their definitions). Resumable state (the policy's trainable parameters, optimiser, Z estimates, RNG, metrics
so far; `fdpipe.training.checkpoint`) is kept in ``state_path`` beside the outputs and
removed after a successful run.
"""
from __future__ import annotations

import json
import logging
import math

import pandas as pd
import torch
from tqdm.auto import tqdm

from fdpipe.common.errors import ConfigError
from fdpipe.common.io import atomic_path, provenance, read_parquet, write_parquet
from fdpipe.common.runtime import seed_everything, set_threads
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.features import FeatureScorer
from fdpipe.fdpg.targets import Target
from fdpipe.models import causal_lm, gold, lora
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.reward_model import RewardModel
from fdpipe.models.trainable import train_spec
from fdpipe.models.trunk import TrunkSplit
from fdpipe.training import checkpoint, distributed
from fdpipe.training.distributed import World

log = logging.getLogger("fdpipe.align")

RANK_SEED_STRIDE = 1_000_003   # sampling seed of process r: seed + r * stride


def _prompt_tokens(tokenizer, path) -> tuple[list, list[list[int]]]:
    prompts = read_parquet(path, required={"prompt_id": None, "prompt": "text"}, min_rows=1)
    tokens = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts["prompt"].tolist()]
    return prompts["prompt_id"].astype(str).tolist(), tokens


def run(*, sft_model, reward_model, prompts_path, run_name: str, run_cfg: dict, seed: int, out_model,
        out_metrics, out_target, state_path, device: str = "auto", threads: int | None = None,
        processes: int = 1) -> pd.DataFrame:
    """Train one f-DPG run and write its outputs; returns the per-step metrics.

    With ``processes > 1`` the run is data-parallel under torchrun: each process samples its
    share of every step's prompts with its own generator, and log Z(c), baselines and metrics
    are computed over the whole batch.
    """
    key = f"alignment.runs.{run_name}"
    cfg = AlignConfig.from_config(run_cfg, key)
    _target(run_cfg, key)
    train_spec(run_cfg, key)
    distributed.check_processes(processes, f"{key}.processes")
    if cfg.prompts_per_step < processes:
        raise ConfigError(f"{key}.prompts_per_step", f"at least {key}.processes ({processes})", cfg.prompts_per_step)
    if processes > 1 and not distributed.in_launched_job():
        distributed.relaunch(run, dict(sft_model=sft_model, reward_model=reward_model, prompts_path=prompts_path,
                                       run_name=run_name, run_cfg=run_cfg, seed=seed, out_model=out_model,
                                       out_metrics=out_metrics, out_target=out_target, state_path=state_path,
                                       device=device, threads=threads), processes)
        return read_parquet(out_metrics)
    set_threads(threads)
    with distributed.world(device) as (world, dev):
        return _train(sft_model, reward_model, prompts_path, run_name, run_cfg, seed, out_model, out_metrics,
                      out_target, state_path, world, dev)


def _target(run_cfg: dict, key: str) -> Target:
    """The run's target; the definitions of its features are the run config's ``features``."""
    return Target.from_config(run_cfg.get("target") or {}, key=f"{key}.target", definitions=run_cfg.get("features"))


def _target_info(target: Target, fit) -> dict:
    """What ``target.json`` holds: everything the evaluation needs to rebuild the target."""
    if target.over_features:
        info = {**target.to_config(), "reward_normalized": True}
        if fit is not None:
            names = [use.name for use in target.moment_uses]
            info["lambda_fit"] = {"moments": dict(zip(names, fit.moment)), "error": fit.error}
        return info
    info = {"kind": target.kind, "beta": target.beta, "threshold": target.threshold, "epsilon": target.epsilon,
            "feature": target.feature, "moment": target.moment, "lambda": target.lam, "reward_normalized": True}
    if fit is not None:
        info["lambda_fit"] = {"moment": fit.moment, "error": fit.error}
    return info


def _train(sft_model, reward_model, prompts_path, run_name, run_cfg, seed, out_model, out_metrics, out_target,
           state_path, world: World, dev) -> pd.DataFrame:
    key = f"alignment.runs.{run_name}"
    cfg = AlignConfig.from_config(run_cfg, key)
    target = _target(run_cfg, key)
    max_new_tokens = int(run_cfg.get("max_new_tokens", 24))
    spec = train_spec(run_cfg, key)
    saves = checkpoint.SaveSchedule.from_config(run_cfg, default_steps=10)
    seed_everything(seed)
    fingerprint = checkpoint.fingerprint({"run": run_name, **run_cfg, "processes": world.size}, seed, {
        "sft_model": sft_model, "reward_model": reward_model, "prompts": prompts_path})

    tokenizer = causal_lm.load_tokenizer(sft_model)
    # the policy and the frozen base a; with LoRA one model, the base with its adapters disabled
    trainable, base_model = lora.policy_and_base(causal_lm.load_causal_lm(sft_model, dev), spec, key=key)
    policy_model = trainable.model
    n_train = sum(p.numel() for p in trainable.params)
    log.info("run %s: %s on %s, %d trainable parameters (%s), %s, %d process(es)", run_name, cfg.divergence,
             target.describe(), n_train, spec.mode, cfg.precision, world.size)
    # micro_batch_size is set on both policies by the Aligner, which owns that setting
    options = {"precision": cfg.precision}
    # the frozen first blocks are the base's: computed once per step and shared (None: full forwards)
    trunk = TrunkSplit.of(base_model, spec.train_layers) if spec.mode != "lora" else None
    if trunk is not None and not (trunk.trunk_frozen(policy_model) and trunk.shares_trunk_with(policy_model)):
        trunk = None
    options["trunk"] = trunk
    policy = CausalPolicy.for_tokenizer(policy_model, tokenizer, max_new_tokens=max_new_tokens, **options)
    base = CausalPolicy.for_tokenizer(base_model, tokenizer, max_new_tokens=max_new_tokens, **options)

    scorer = RewardModel.load(reward_model, dev, normalize=True)
    reward_fn = lambda samples: scorer.score(samples.texts).to(dev)
    gold_fn = lambda samples: torch.from_numpy(gold.gold_reward(samples.texts))
    # features are read once per sample, from the decoded texts (classifiers and callables load here)
    feature_fn = FeatureScorer(target.feature_specs, device=dev) if target.over_features else None
    keys, tokens = _prompt_tokens(tokenizer, prompts_path)
    # every process draws from its own stream; a single process uses the seed itself
    generator = torch.Generator(device=dev).manual_seed(seed + RANK_SEED_STRIDE * world.rank)
    aligner = Aligner(policy, base, reward_fn, target, PromptCycle(keys, tokens, seed), cfg,
                      generator=generator, gold_fn=gold_fn, feature_fn=feature_fn, world=world,
                      state_path=state_path)

    rows: list[dict] = []
    state = checkpoint.load_state(state_path, fingerprint)
    if state is not None:
        aligner.load_state_dict(state["aligner"][world.rank] if world.size > 1 else state["aligner"],
                                source=state_path)
        rows = list(state["metrics"])
        log.info("resumed %s at step %d", run_name, aligner.step_count)

    bar = tqdm(total=cfg.steps, initial=aligner.step_count, desc=f"align {run_name}", unit="step",
               disable=not world.is_main)
    while aligner.step_count < cfg.steps:
        metrics = aligner.step()
        rows.append(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", gold=f"{metrics.get('gold_mean', math.nan):.3f}",
                        kl=f"{metrics['kl_pi_a']:.3f}", obj=f"{metrics['objective']:.3g}")
        log.info("step %d %s", metrics["step"], " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                           if isinstance(v, float)))
        # rank 0's clock decides for every rank: each one's state goes into the file
        if saves.due(aligner.step_count, world) and aligner.step_count < cfg.steps:
            # each process's sampling stream differs: the state keeps every rank's
            states = aligner.state_dict() if world.size == 1 else world.gather_objects(aligner.state_dict())
            if world.is_main:
                checkpoint.save_state(state_path, fingerprint, aligner=states, metrics=rows)
            saves.saved()
    bar.close()

    frame = pd.DataFrame(rows)
    frame.insert(0, "run", run_name)
    frame.insert(1, "divergence", cfg.divergence)
    frame.insert(2, "target", target.describe())
    if world.is_main:
        meta = provenance({"run": run_name, **run_cfg}, seed, stage="align", processes=world.size)
        target_info = _target_info(target, aligner.lambda_fit)
        trainable.save(tokenizer, out_model)   # LoRA: adapters merged, the adapter in out_model/adapter
        write_parquet(frame, out_metrics, meta)
        with atomic_path(out_target) as tmp:
            tmp.write_text(json.dumps(target_info, indent=2))
        checkpoint.remove_state(state_path)
    world.barrier()
    return frame
