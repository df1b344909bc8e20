"""Evaluation stage: sample a policy on held-out prompts, score the samples, summarize.

For one policy (the SFT model or an aligned run) `run` does, in order:
1. draw ``samples_per_prompt`` completions for each held-out prompt by pure ancestral
   sampling (temperature 1, no top-k/top-p; seeded), in batches of ``batch_prompts`` prompts;
2. score every sample: proxy reward (the reward model on the full text, prompt + completion,
   as alignment scores it), gold reward (VADER compound of the same full text), ``log π``
   and per-token entropy under the policy, ``log a`` under the SFT model;
3. write ``samples.parquet`` (one row per sample) and ``summary.parquet`` (tidy: one row per
   metric, with a 95% interval).

Summary metrics of every policy: mean proxy and gold reward, ``KL(π‖SFT)`` (the mean of
``log π − log a`` over the policy's own samples), entropy per token, completion length,
distinct-1..n and self-BLEU of the completions. Intervals of means are bootstrap
percentile intervals that resample prompts (the samples of one prompt are correlated).

For an aligned run, the target ``p ∝ a·exp(log_potential(r))`` of that run (read from its
``target.json``) is known, and importance sampling estimates ``D_f(π‖p)`` for every
generator ``f`` from the policy's samples (``q = π``) with ``Z(c)`` self-normalized per
prompt; intervals are ``value ± z·stderr``. The same estimates for the SFT model against
that target come from the SFT samples (``q = a``) and are written with ``policy = sft``,
``run = <run>``; so the SFT evaluation itself never depends on an alignment run.

For a run whose target is written over named features, each feature ``φ_k`` is computed
once per sample (`fdpipe.fdpg.features.FeatureScorer`) of the run's policy and of the SFT
model, and ``E[φ_k]`` is reported per policy (metric ``feature_<name>``, bootstrap interval
over prompts) with the requested moment beside it (column ``requested``); the run's
``samples.parquet`` gets one ``feature_<name>`` column per feature.

The proxy reward is stored as ``reward_raw`` (the model's score) and ``reward`` (standardized
by ``reward_stats.json``: the scale alignment trains on); a target is evaluated on ``reward``
when its ``target.json`` says ``"reward_normalized": true``, on ``reward_raw`` otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fdpipe.common import text_metrics
from fdpipe.common.config import known_keys
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import provenance, read_parquet, write_parquet
from fdpipe.common.runtime import pick_device, set_threads
from fdpipe.common.stats import bootstrap_ci, normal_interval
from fdpipe.common.tables import (FEATURE_SAMPLE_COLUMN, SAMPLE_COLUMNS, summary_columns, summary_frame,
                                  summary_row)
from fdpipe.fdpg import estimators
from fdpipe.fdpg.features import FeatureScorer
from fdpipe.fdpg.targets import Target
from fdpipe.models import precision as precisions
from fdpipe.models.causal_lm import load_causal_lm, load_tokenizer
from fdpipe.models.gold import gold_reward
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.trunk import TrunkSplit
from fdpipe.models.reward_model import RewardModel

log = logging.getLogger("fdpipe.evaluate")

SFT = "sft"

# Names follow the training metrics of fdpipe.fdpg.metrics.STEP_METRICS where they coincide.
DIVERGENCE_METRICS = {"rkl": "kl_pi_p", "fkl": "kl_p_pi", "js": "js", "tv": "tv", "chi2": "chi2",
                      "rchi2": "rchi2"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The ``evaluation`` config section. Defaults equal those of the config schema."""

    samples_per_prompt: int = 4      # completions per held-out prompt
    max_new_tokens: int = 20         # longest completion (as alignment.defaults)
    max_prompts: int | None = None   # first N held-out prompts (None: all)
    batch_prompts: int = 16          # prompts per sampling/scoring batch
    reward_batch_size: int = 64      # texts per reward-model forward
    bootstrap_resamples: int = 1000  # bootstrap replicates for mean intervals
    confidence: float = 0.95         # interval coverage
    distinct_max_n: int = 3          # distinct-1..N
    bleu_max_n: int = 4              # n-gram order of self-BLEU
    micro_batch_size: int | None = None  # sequences per forward pass when sampling and scoring (None: a whole batch)
    precision: str | None = None     # fp32 | bf16 (None: fp32): autocast of the policies' forward passes

    @classmethod
    def from_dict(cls, cfg: dict | None, key: str = "evaluation") -> "EvalConfig":
        cfg = known_keys(cfg, [f.name for f in dataclasses.fields(cls)], key)
        out = cls(**cfg)
        for name in ("samples_per_prompt", "max_new_tokens", "batch_prompts", "reward_batch_size",
                     "bootstrap_resamples", "distinct_max_n", "bleu_max_n"):
            value = getattr(out, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}.{name}", "a positive integer", value)
        for name in ("max_prompts", "micro_batch_size"):
            value = getattr(out, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{key}.{name}", "a positive integer or null", value)
        precisions.check(out.precision, f"{key}.precision")
        if not isinstance(out.confidence, (int, float)) or not 0 < out.confidence < 1:
            raise ConfigError(f"{key}.confidence", "a number in (0, 1)", out.confidence)
        return out


# --------------------------------------------------------------------------- inputs

def read_prompts(path, max_prompts: int | None = None) -> pd.DataFrame:
    """Held-out prompts (columns prompt_id, prompt), the first `max_prompts` of them."""
    df = read_parquet(path, required=("prompt_id", "prompt"), min_rows=1)
    df = df[["prompt_id", "prompt"]].astype({"prompt_id": str, "prompt": str})
    if df["prompt_id"].duplicated().any():
        raise DataError(path, f"duplicate prompt_id {df['prompt_id'][df['prompt_id'].duplicated()].iloc[0]!r}")
    if max_prompts is not None:
        df = df.head(max_prompts)
    return df.reset_index(drop=True)


def read_target(path) -> tuple[Target, bool]:
    """The target of an alignment run from its ``target.json`` (fitted λ included).

    Returns the target and whether it is defined on standardized rewards
    (``"reward_normalized"``, false when absent).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found (it is written by the align stage)")
    try:
        spec = json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(path, f"not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise DataError(path, "expected a JSON object")
    try:
        target = Target.from_config(spec, key=str(path), definitions=spec.get("feature_definitions"))
    except ConfigError as exc:
        raise DataError(path, str(exc)) from None
    if target.kind == "distributional" and target.lam is None:
        raise DataError(path, "distributional target without a fitted 'lambda'")
    normalize = spec.get("reward_normalized", False)
    if not isinstance(normalize, bool):
        raise DataError(path, f"'reward_normalized' must be true or false, got {normalize!r}")
    return target, normalize


def encode_prompts(tokenizer, prompts: list[str], source="prompts") -> list[list[int]]:
    """Token ids of each prompt without special tokens (as the align stage encodes them)."""
    ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for p, tokens in zip(prompts, ids):
        if not tokens:
            raise DataError(source, f"prompt {p!r} encodes to no tokens")
    return ids


# --------------------------------------------------------------------------- sampling

def sample_policy(policy: CausalPolicy, prompts: pd.DataFrame, cfg: EvalConfig, *, name: str,
                  generator: torch.Generator, reward_fn, gold_fn, reward_stats: tuple[float, float] = (0.0, 1.0),
                  sft: CausalPolicy | None = None, progress: bool = True) -> pd.DataFrame:
    """Sample and score `policy` on `prompts`; one row per sample (see `SAMPLE_COLUMNS`).

    Args:
        policy: the policy, with a tokenizer (to decode texts).
        prompts: columns prompt_id, prompt.
        name: policy name written in the `policy` column.
        generator: torch generator on the policy's device (seeds the samples).
        reward_fn: list of texts → tensor/array of raw proxy rewards.
        gold_fn: list of texts → array of gold rewards.
        reward_stats: ``(mean, std)`` that standardize the raw rewards into `reward`.
        sft: the SFT model; None when `policy` is the SFT model itself (``logp_sft = logp_policy``).
    """
    if policy.tokenizer is None:
        raise ValueError("the policy needs a tokenizer to decode its samples")
    k = cfg.samples_per_prompt
    token_lists = encode_prompts(policy.tokenizer, prompts["prompt"].tolist())
    frames = []
    starts = range(0, len(prompts), cfg.batch_prompts)
    for start in tqdm(starts, desc=f"evaluate {name}", unit="batch", disable=not progress, mininterval=1.0):
        chunk = prompts.iloc[start:start + cfg.batch_prompts]
        samples = policy.sample(token_lists[start:start + len(chunk)], k, generator=generator,
                                prompt_keys=chunk["prompt_id"].tolist(), capture_trunk=policy.trunk is not None)
        with torch.no_grad():
            scores = policy.score(samples, with_entropy=True)
            logp_sft = sft.score(samples).logprobs if sft is not None else scores.logprobs
        frames.append(pd.DataFrame({
            "policy": name,
            "prompt_id": samples.prompt_keys,
            "sample": np.tile(np.arange(k), len(chunk)),
            "prompt": np.repeat(chunk["prompt"].to_numpy(), k),
            "completion": samples.completions,
            "text": samples.texts,
            "length": samples.lengths().cpu().numpy().astype(np.int64),
            "logp_policy": scores.logprobs.double().cpu().numpy(),
            "logp_sft": logp_sft.double().cpu().numpy(),
            "entropy": scores.entropy.double().sum(-1).cpu().numpy(),
        }))
    df = pd.concat(frames, ignore_index=True)
    texts = df["text"].tolist()
    raw = torch.as_tensor(reward_fn(texts)).double().cpu().numpy()
    mean, std = reward_stats
    df["reward"] = (raw - mean) / max(std, 1e-12)
    df["reward_raw"] = raw
    df["gold"] = np.asarray(gold_fn(texts), dtype=np.float64)
    return df[list(SAMPLE_COLUMNS)]


# --------------------------------------------------------------------------- summaries

def summarize(samples: pd.DataFrame, cfg: EvalConfig, *, policy: str, run: str, divergence: str | None,
              target: str | None, seed: int) -> list[dict]:
    """Target-free metrics of one policy's samples (rows of the summary table)."""
    groups = samples["prompt_id"].to_numpy()
    n = len(samples)
    rows = []

    def meansummary_row(metric, values, weights=None):
        ci = bootstrap_ci(values, weights=weights, groups=groups, confidence=cfg.confidence,
                          resamples=cfg.bootstrap_resamples, seed=seed)
        rows.append(summary_row(policy, run, divergence, target, metric, ci.value, ci.low, ci.high, n))

    length = samples["length"].to_numpy(dtype=np.float64)
    meansummary_row("reward_mean", samples["reward"].to_numpy())
    meansummary_row("gold_mean", samples["gold"].to_numpy())
    meansummary_row("kl_pi_sft", (samples["logp_policy"] - samples["logp_sft"]).to_numpy())
    meansummary_row("entropy_per_token", samples["entropy"].to_numpy() / np.maximum(length, 1), weights=length)
    meansummary_row("completion_length", length)
    completions = samples["completion"].tolist()
    for order in range(1, cfg.distinct_max_n + 1):
        rows.append(summary_row(policy, run, divergence, target, f"distinct_{order}",
                         text_metrics.distinct_n(completions, order), n=n))
    rows.append(summary_row(policy, run, divergence, target, "self_bleu",
                     text_metrics.self_bleu(completions, max_n=cfg.bleu_max_n), n=n))
    return rows


def target_reward(samples: pd.DataFrame, reward_normalized: bool) -> torch.Tensor:
    """The rewards a target sees: column ``reward`` (standardized) or ``reward_raw``."""
    column = samples["reward" if reward_normalized else "reward_raw"]
    return torch.as_tensor(column.to_numpy(dtype=np.float64, copy=True))


def feature_values(samples: pd.DataFrame, scorer: FeatureScorer, reward_normalized: bool) -> torch.Tensor:
    """``[N, K]`` features of the samples (texts, completions and the target's rewards)."""
    return scorer.values(texts=samples["text"].tolist(), completions=samples["completion"].tolist(),
                         reward=target_reward(samples, reward_normalized))


def feature_rows(samples: pd.DataFrame, phi: torch.Tensor, target: Target, cfg: EvalConfig, *, policy: str,
                 run: str, divergence: str, seed: int) -> list[dict]:
    """``E[φ_k]`` over the samples for each feature of the target (bootstrap over prompts),
    with the requested moment in ``requested`` (NaN for a condition)."""
    codes, _ = pd.factorize(samples["prompt_id"])
    requested = target.requested()
    rows = []
    for k, name in enumerate(target.feature_names):
        ci = bootstrap_ci(phi[:, k].numpy(), groups=codes, confidence=cfg.confidence,
                          resamples=cfg.bootstrap_resamples, seed=seed)
        row = summary_row(policy, run, divergence, target.describe(), f"feature_{name}", ci.value, ci.low, ci.high,
                          len(samples))
        rows.append({**row, "requested": float(requested.get(name, math.nan))})
    return rows


def target_divergences(samples: pd.DataFrame, target: Target, cfg: EvalConfig, *, policy: str, run: str,
                       divergence: str, reward_normalized: bool, seed: int, phi: torch.Tensor | None = None
                       ) -> list[dict]:
    """``D_f(π‖p)`` for every generator, ``log Z`` and the constraint, from samples of π itself.

    The target sees the column ``reward`` (standardized) when `reward_normalized`, else
    ``reward_raw``, and, over features, their values `phi` ``[N, K]``.
    ``log P = logp_sft + log_potential(reward)``; ``Z(c)`` is self-normalized per prompt from
    the same samples, so the estimates are consistent (biased for few samples per prompt).
    A distributional target over features has no single constraint: no ``constraint`` row.
    """
    codes, uniques = pd.factorize(samples["prompt_id"])
    group = torch.as_tensor(codes, dtype=torch.long)
    num_groups = len(uniques)
    reward = target_reward(samples, reward_normalized)
    log_pi = torch.as_tensor(samples["logp_policy"].to_numpy(), dtype=torch.float64)
    log_a = torch.as_tensor(samples["logp_sft"].to_numpy(), dtype=torch.float64)
    if target.over_features:
        log_target = log_a + target.log_potential(reward, phi).double()
    else:
        log_target = log_a + target.log_potential(reward).double()
    estimates = estimators.importance_divergences(log_pi, log_target, log_pi, group, num_groups)
    n = len(samples)
    describe = target.describe()
    rows = []
    for name, metric in DIVERGENCE_METRICS.items():
        est = estimates[name]
        low, high = normal_interval(est.value, est.stderr, cfg.confidence)
        rows.append(summary_row(policy, run, divergence, describe, metric, est.value, low, high, n))
    est = estimates[divergence]
    low, high = normal_interval(est.value, est.stderr, cfg.confidence)
    rows.append(summary_row(policy, run, divergence, describe, "objective", est.value, low, high, n))
    log_z = estimators.log_partition(log_target - log_pi, group, num_groups)
    rows.append(summary_row(policy, run, divergence, describe, "log_z", float(log_z.mean()), n=n))
    if target.over_features and target.kind == "distributional":
        return rows
    ci = bootstrap_ci(target.constraint(reward, phi).numpy(), groups=codes, confidence=cfg.confidence,
                      resamples=cfg.bootstrap_resamples, seed=seed)
    rows.append(summary_row(policy, run, divergence, describe, "constraint", ci.value, ci.low, ci.high, n))
    return rows


# --------------------------------------------------------------------------- stage

def run(policy: str, policy_model, sft_model, reward_model, prompts_path, samples_path, summary_path,
        cfg: dict | None, seed: int, *, divergence: str | None = None, target_path=None,
        sft_samples_path=None, device: str = "auto", threads: int | None = None,
        config: dict | None = None) -> pd.DataFrame:
    """Evaluate one policy and write `samples_path` and `summary_path`; returns the summary.

    Args:
        policy: ``sft`` or the alignment run's name.
        policy_model, sft_model, reward_model: ``save_pretrained`` folders (``policy_model``
            is ignored for ``sft``).
        prompts_path: prompts_eval.parquet.
        cfg: the ``evaluation`` config section.
        seed: seed of the sampling generator and of the bootstrap.
        divergence, target_path, sft_samples_path: the run's divergence, its target.json and
            the SFT model's samples.parquet; required for an aligned policy, unused for ``sft``.
        config: what the outputs' config hash covers (defaults to the arguments above).
    """
    eval_cfg = EvalConfig.from_dict(cfg)
    aligned = policy != SFT
    if aligned and (divergence is None or target_path is None or sft_samples_path is None):
        raise ValueError(f"policy {policy!r}: an aligned policy needs divergence, target_path and sft_samples_path")
    if aligned and divergence not in DIVERGENCE_METRICS:
        raise ConfigError(f"alignment.runs.{policy}.divergence", f"one of {', '.join(DIVERGENCE_METRICS)}",
                          divergence)
    prompts = read_prompts(prompts_path, eval_cfg.max_prompts)
    target, reward_normalized = read_target(target_path) if aligned else (None, False)
    sft_samples = read_parquet(sft_samples_path, required=list(SAMPLE_COLUMNS), min_rows=1) if aligned else None

    set_threads(threads)
    dev = pick_device(device)
    t0 = time.perf_counter()
    model_path = policy_model if aligned else sft_model
    tokenizer = load_tokenizer(model_path)
    options = {"precision": eval_cfg.precision or "fp32", "micro_batch_size": eval_cfg.micro_batch_size}
    pi = CausalPolicy.for_tokenizer(load_causal_lm(model_path, dev), tokenizer,
                                    max_new_tokens=eval_cfg.max_new_tokens, **options)
    sft = None
    if aligned:
        sft = CausalPolicy.for_tokenizer(load_causal_lm(sft_model, dev), tokenizer,
                                         max_new_tokens=eval_cfg.max_new_tokens, decode=False, **options)
    # the blocks shared with the SFT model (all, for itself) run once, while sampling; scoring runs the rest
    pi.trunk = TrunkSplit.common(pi.model, sft.model if aligned else pi.model)
    if sft is not None:
        sft.trunk = pi.trunk
    scorer = RewardModel.load(reward_model, dev)
    log.info("policy %s: %d prompts x %d samples, %d new tokens, device %s (models loaded in %.1f s)",
             policy, len(prompts), eval_cfg.samples_per_prompt, eval_cfg.max_new_tokens, dev,
             time.perf_counter() - t0)

    generator = torch.Generator(device=dev).manual_seed(seed)
    t1 = time.perf_counter()
    samples = sample_policy(pi, prompts, eval_cfg, name=policy, generator=generator,
                            reward_fn=lambda texts: scorer.score(texts, batch_size=eval_cfg.reward_batch_size),
                            gold_fn=gold_reward, reward_stats=(scorer.mean, scorer.std), sft=sft)
    log.info("sampled and scored %d completions in %.1f s", len(samples), time.perf_counter() - t1)

    run_name = policy if aligned else SFT
    describe = target.describe() if aligned else None
    rows = summarize(samples, eval_cfg, policy=policy, run=run_name, divergence=divergence if aligned else None,
                     target=describe, seed=seed)
    columns = dict(SAMPLE_COLUMNS)
    if aligned:
        phi = sft_phi = None
        if target.over_features:
            scorer = FeatureScorer(target.feature_specs, device=dev)
            phi = feature_values(samples, scorer, reward_normalized)
            sft_phi = feature_values(sft_samples, scorer, reward_normalized)
            samples = samples.assign(**{f"feature_{name}": phi[:, k].numpy()
                                        for k, name in enumerate(target.feature_names)})
            columns.update({f"feature_{name}": FEATURE_SAMPLE_COLUMN.format(name=name)
                            for name in target.feature_names})
        for who, frame, values in ((policy, samples, phi), (SFT, sft_samples, sft_phi)):
            rows += target_divergences(frame, target, eval_cfg, policy=who, run=policy, divergence=divergence,
                                       reward_normalized=reward_normalized, seed=seed, phi=values)
            if target.over_features:
                rows += feature_rows(frame, values, target, eval_cfg, policy=who, run=policy, divergence=divergence,
                                     seed=seed)
    summary = summary_frame(rows)

    meta_config = config if config is not None else {
        "evaluation": dataclasses.asdict(eval_cfg), "policy": policy, "divergence": divergence,
        "target": target.as_dict() if target is not None else None,
        "reward_normalized": reward_normalized}
    meta = provenance(meta_config, seed, stage="evaluate", policy=policy, columns=columns,
                      target_spec=target.as_dict() if target is not None else None,
                      elapsed_s=round(time.perf_counter() - t0, 2))
    write_parquet(samples, samples_path, meta)
    write_parquet(summary, summary_path, {**meta, "columns": summary_columns(summary)})
    by_metric = summary[(summary["policy"] == policy)].set_index("metric")["value"]
    log.info("policy %s: reward %.3f, gold %.3f, KL(pi||sft) %.3f, distinct-2 %.3f, self-BLEU %.3f (%.1f s)",
             policy, by_metric["reward_mean"], by_metric["gold_mean"], by_metric["kl_pi_sft"],
             by_metric.get("distinct_2", math.nan), by_metric["self_bleu"], time.perf_counter() - t0)
    return summary
