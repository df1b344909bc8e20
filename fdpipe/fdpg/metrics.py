"""What one f-DPG step reports, computed over the step's whole (global) batch.

`pool` puts the per-sample quantities of this process's samples together with those of the
other processes of a data-parallel job (rank order), so that `log Z(c)`, baselines and every
metric are the ones a single process would compute on the whole batch; `step_metrics`
computes the metrics of `STEP_METRICS` from such a pooled batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdpipe.fdpg import estimators
from fdpipe.training.distributed import World

STEP_METRICS = {
    "objective": "importance-sampling estimate of D_f(π‖p) for the run's divergence",
    "loss": "surrogate loss whose gradient is the f-DPG gradient estimate",
    "pseudo_reward_mean": "mean of −f′(π/p) over the batch",
    "pseudo_reward_std": "standard deviation of −f′(π/p)",
    "log_z": "mean over the batch's prompts of the log Z(c) estimate",
    "kl_p_pi": "KL(p‖π) by importance sampling",
    "kl_pi_p": "KL(π‖p) by importance sampling",
    "js": "Jensen–Shannon divergence between π and p by importance sampling",
    "tv": "total variation distance between π and p by importance sampling",
    "chi2": "Pearson χ² divergence D_chi2(π‖p) by importance sampling",
    "rchi2": "Neyman χ² divergence D_rchi2(π‖p) by importance sampling",
    "kl_pi_a": "KL(π‖a), sequence-level Monte-Carlo estimate",
    "kl_pi_a_tokens": "KL(π‖a) as the sum over completion tokens of the exact per-token KL over the vocabulary "
                      "(NaN when token_kl is off)",
    "reward_mean": "mean proxy reward of the policy's samples",
    "gold_mean": "mean gold reward of the policy's samples (when a gold scorer is given)",
    "constraint": "E_π[b] (pointwise), E_π[φ] (distributional) or E_π[r] (rlhf); over features: E_π[Π_k b_k] "
                  "(pointwise: every condition met), E_π[r] (rlhf), NaN (distributional: see feature_<name>)",
    "entropy_per_token": "mean per-token entropy of π on its completions",
    "completion_length": "mean completion length in tokens",
    "logprob_gap": "largest |log π at sampling − log π in the training forward| (on-policy only)",
    "grad_norm": "gradient norm before clipping",
    "lambda": "λ of a distributional target over the reward (NaN otherwise: see lambda_<name>)",
    "proposal_replaced": "1 when the offline proposal was replaced by the policy at this step",
    "time_sample_s": "seconds spent sampling",
    "time_score_s": "seconds spent computing rewards and base log-probabilities",
    "time_train_s": "seconds spent in the policy forward, backward and optimiser step",
    "time_step_s": "seconds for the whole step",
}

# Columns of a run whose target is written over features, one per feature (after `lambda`).
FEATURE_METRICS = {
    "feature_<name>": "E_π[φ_name]: mean of the feature over the policy's samples (importance-weighted as the other "
                      "means); one column per feature of the target",
    "lambda_<name>": "λ_name of a distributional target over features, one column per feature with a moment",
}



@dataclass
class PooledBatch:
    """Per-sample float64 vectors of the global batch, with each sample's prompt group."""

    values: dict            # name -> tensor [N] (N samples over every rank)
    group: torch.Tensor     # [N] prompt index within the global batch
    num_groups: int
    keys: list              # [N] prompt key of each sample
    mine: slice             # this rank's samples within the N
    totals: dict            # name -> sums over every rank (entropy, tokens, loss)

    def __len__(self) -> int:
        return self.group.numel()


def pool(world: World, samples, values: dict, totals: dict) -> PooledBatch:
    """Gather `values` (per-sample tensors of this rank's `samples`) and sum `totals` over ranks."""
    sizes = world.gather_objects((len(samples), samples.num_prompts))
    rank = world.rank
    first_sample = sum(n for n, _ in sizes[:rank])
    first_group = sum(g for _, g in sizes[:rank])
    group = world.gather(samples.prompt_index + first_group)
    keys = [k for part in world.gather_objects(list(samples.prompt_keys)) for k in part]
    return PooledBatch(values={k: world.gather(v) for k, v in values.items()}, group=group,
                       num_groups=sum(g for _, g in sizes), keys=keys,
                       mine=slice(first_sample, first_sample + len(samples)),
                       totals={k: world.sum(v) for k, v in totals.items()})


def step_metrics(batch: PooledBatch, *, divergence: str, log_z, rewards, grad_norm, constraint,
                 target, on_policy: bool) -> dict:
    """The step's metrics (see `STEP_METRICS` and `FEATURE_METRICS`) from the pooled batch.

    `batch.values` holds log_pi, log_a, log_target, log_q, reward, sample_logprobs, length and,
    when recorded, kl_tokens, gold and phi (the target's features, ``[N, K]``); `batch.totals`
    holds loss, entropy and tokens. `constraint` is the per-sample value of the target's
    constraint (`fdpipe.fdpg.targets.Target.constraint`) and `target` the run's target.
    """
    v, group, n_groups = batch.values, batch.group, batch.num_groups
    log_pi, log_q = v["log_pi"], v["log_q"]
    est = estimators.importance_divergences(log_pi, v["log_target"], log_q, group, n_groups, log_z=log_z)
    w = torch.exp(log_pi - log_q)                    # π/q: 1 on-policy
    w_norm = w / w.mean()
    kl_tokens = float((w_norm * v["kl_tokens"]).mean()) if "kl_tokens" in v else math.nan
    gap = (v["sample_logprobs"] - log_pi).abs().max() if on_policy else torch.tensor(math.nan)
    out = {
        "objective": est[divergence].value,
        "loss": float(batch.totals["loss"]),
        "pseudo_reward_mean": float(rewards.mean()),
        "pseudo_reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "log_z": float(estimators.group_mean(log_z, group, n_groups).mean()),
        "kl_p_pi": est["fkl"].value, "kl_p_pi_se": est["fkl"].stderr,
        "kl_pi_p": est["rkl"].value, "kl_pi_p_se": est["rkl"].stderr,
        "js": est["js"].value, "tv": est["tv"].value, "chi2": est["chi2"].value, "rchi2": est["rchi2"].value,
        "kl_pi_a": float((w_norm * (log_pi - v["log_a"])).mean()),
        "kl_pi_a_tokens": kl_tokens,
        "reward_mean": float((w_norm * v["reward"]).mean()),
        "constraint": float((w_norm * constraint).mean()),
        "entropy_per_token": float(batch.totals["entropy"] / batch.totals["tokens"].clamp(min=1)),
        "completion_length": float(v["length"].mean()),
        "logprob_gap": float(gap),
        "grad_norm": float(grad_norm),
        "lambda": float(target.lam) if target.lam is not None and not target.over_features else math.nan,
    }
    if "phi" in v:
        for k, name in enumerate(target.feature_names):
            out[f"feature_{name}"] = float((w_norm * v["phi"][:, k]).mean())
        lambdas = target.lambdas()
        for use in target.moment_uses:
            out[f"lambda_{use.name}"] = float(lambdas.get(use.name, math.nan))
    if "gold" in v:
        out["gold_mean"] = float((w_norm.cpu() * v["gold"].cpu()).mean())
    return out
