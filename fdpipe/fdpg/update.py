"""The f-DPG update: pseudo-rewards, baselines and the surrogate loss.

Minimising ``D_f(π_θ‖p)`` has gradient ``E_{x~π_θ}[f′(π_θ(x)/p(x)) ∇ log π_θ(x)]``. With
samples from a proposal ``q`` the expectation is reweighted by ``w = π_θ/q``, so the
estimator of the gradient is ``−mean_i w_i (R_i − B_i) ∇ log π_θ(x_i)`` with pseudo-reward
``R = −f′(π_θ/p)``. A baseline ``B_i`` that does not depend on ``x_i`` leaves it unbiased,
because ``E_q[w ∇ log π_θ] = E_π[∇ log π_θ] = 0``:

* ``loo`` (default): the mean pseudo-reward of the *other* samples of the same prompt
  (of the whole batch when a prompt has one sample) — unbiased;
* ``mean``: the batch mean including the sample itself — slightly biased (O(1/n));
* ``none``.

``log t = log π_θ(x) − log P(x) + log Z(c)``; ``Z(c)`` comes from `estimators`.
"""
from __future__ import annotations

import torch

from fdpipe.fdpg import divergences
from fdpipe.fdpg.estimators import group_counts

BASELINES = ("loo", "mean", "none")


def pseudo_rewards(divergence: str, log_pi: torch.Tensor, log_target: torch.Tensor,
                   log_z: torch.Tensor) -> torch.Tensor:
    """``R(x) = −f′(π(x)/p(x))`` computed from log-probabilities (no gradient)."""
    log_t = log_pi.detach().double() - log_target.detach().double() + log_z.detach().double()
    return divergences.get(divergence).pseudo_reward(log_t)


def baseline(rewards: torch.Tensor, group: torch.Tensor, num_groups: int, kind: str = "loo") -> torch.Tensor:
    """Per-sample baseline (see module docstring)."""
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "mean":
        return rewards.mean().expand_as(rewards)
    if kind != "loo":
        raise ValueError(f"unknown baseline {kind!r}; expected one of {', '.join(BASELINES)}")
    n = rewards.numel()
    counts = group_counts(group, num_groups)[group]
    group_sum = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, rewards)[group]
    per_prompt = (group_sum - rewards) / (counts - 1).clamp(min=1)
    whole_batch = (rewards.sum() - rewards) / max(n - 1, 1)
    return torch.where(counts > 1, per_prompt, whole_batch)


def surrogate_loss(log_pi: torch.Tensor, advantages: torch.Tensor,
                   importance_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``−mean_i w_i A_i log π_θ(x_i)``: its gradient is the f-DPG gradient estimate.

    ``advantages`` (``R − B``) and ``importance_weights`` (``π_θ/q``) are treated as constants.
    """
    coef = advantages.detach().to(log_pi.dtype)
    if importance_weights is not None:
        coef = coef * importance_weights.detach().to(log_pi.dtype)
    return -(coef * log_pi).mean()
