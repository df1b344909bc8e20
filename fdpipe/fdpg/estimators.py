"""Monte-Carlo estimators: partition functions and divergences by importance sampling.

Samples ``x ~ q(·|c)`` are grouped by prompt ``c`` (``group`` holds each sample's prompt
index). With unnormalised target ``P``:

* ``Z(c) = E_q[P/q]``, estimated per prompt in log space (`log_partition`); `RunningLogZ`
  pools the estimates of prompts seen at several steps;
* ``D_f(π‖p) = E_q[(p/q) f(π/p)]`` for every generator (`importance_divergences`); with
  ``log_z=None`` the weights are self-normalised within each prompt.

All estimates are averaged over prompts, i.e. they estimate ``E_c[D_f(π(·|c)‖p(·|c))]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdpipe.fdpg import divergences


def group_logsumexp(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``log Σ_{i in g} exp(values_i)`` for every group ``g`` (−inf for empty groups)."""
    values = values.double()
    peak = torch.full((num_groups,), -math.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, group, values, reduce="amax", include_self=True)
    safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    sums = torch.zeros_like(peak).index_add_(0, group, torch.exp(values - safe_peak[group]))
    return torch.log(sums) + safe_peak


def group_counts(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.bincount(group, minlength=num_groups).to(torch.float64)


def group_mean(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    sums = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(0, group, values.double())
    return sums / group_counts(group, num_groups).clamp(min=1)


def log_partition(log_weights: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-prompt ``log Ẑ(c) = log mean_i P(x_i|c)/q(x_i|c)`` from log importance weights."""
    return group_logsumexp(log_weights, group, num_groups) - torch.log(group_counts(group, num_groups))


class RunningLogZ:
    """Pooled estimate of ``log Z(c)`` per prompt key over every batch that contained it.

    Each update adds the batch's importance weights to the prompt's running sum, so a prompt
    seen at several steps gets the mean of all its weights (the estimate improves with time
    as long as the target does not change).
    """

    def __init__(self):
        self._log_sum: dict = {}
        self._count: dict = {}

    def __len__(self):
        return len(self._count)

    def update(self, keys: list, log_weights: torch.Tensor) -> torch.Tensor:
        """Add samples (one key per sample); return the pooled ``log Ẑ`` of each sample's prompt."""
        lw = log_weights.detach().double().cpu()
        for key, value in zip(keys, lw.tolist()):
            prev = self._log_sum.get(key, -math.inf)
            self._log_sum[key] = float(torch.logaddexp(torch.tensor(prev, dtype=torch.float64),
                                                        torch.tensor(value, dtype=torch.float64)))
            self._count[key] = self._count.get(key, 0) + 1
        return torch.tensor([self.log_z(k) for k in keys], dtype=torch.float64, device=log_weights.device)

    def log_z(self, key) -> float:
        return self._log_sum[key] - math.log(self._count[key])

    def state_dict(self) -> dict:
        return {"log_sum": dict(self._log_sum), "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:
        self._log_sum = dict(state["log_sum"])
        self._count = dict(state["count"])


@dataclass
class Estimate:
    value: float
    stderr: float


def _mean_and_stderr(terms: torch.Tensor, group: torch.Tensor, num_groups: int) -> Estimate:
    """Average per-prompt means; the standard error treats prompts as independent."""
    means = group_mean(terms, group, num_groups)
    counts = group_counts(group, num_groups)
    centered = terms.double() - means[group]
    var = torch.zeros_like(means).index_add_(0, group, centered ** 2) / (counts - 1).clamp(min=1)
    value = means.mean()
    stderr = torch.sqrt((var / counts.clamp(min=1)).sum()) / num_groups
    return Estimate(float(value), float(stderr))


def importance_divergences(log_pi: torch.Tensor, log_target: torch.Tensor, log_q: torch.Tensor,
                           group: torch.Tensor, num_groups: int, *, log_z: torch.Tensor | None = None,
                           names=divergences.NAMES) -> dict[str, Estimate]:
    """Estimate ``D_f(π‖p)`` for the named generators from samples of ``q``.

    Args:
        log_pi: ``log π(x|c)`` of each sample.
        log_target: ``log P(x|c)`` (unnormalised target).
        log_q: ``log q(x|c)``, the distribution the samples were drawn from.
        group, num_groups: prompt index of each sample.
        log_z: ``log Z(c)`` per sample; ``None`` self-normalises the weights per prompt.
    Returns:
        name → Estimate(value, stderr); ``rkl`` is ``KL(π‖p)`` and ``fkl`` is ``KL(p‖π)``.

    Samples outside the target's support (``P = 0``) contribute ``(π/q) · lim f(t)/t``
    (`divergences.SLOPE_AT_INFINITY`: infinite for rkl and chi2). With ``log_z=None`` the
    standard error is the delta-method one of the ratio estimator: ``Ẑ`` comes from the same
    samples and ``t = π Ẑ/P`` depends on it, so each sample's influence is
    ``(p/q)(f(t) + c) − D − c`` with ``c = E_p[t f′(t) − f(t)]`` (estimated per prompt).
    """
    log_pi, log_target, log_q = log_pi.detach().double(), log_target.detach().double(), log_q.detach().double()
    self_normalised = log_z is None
    if self_normalised:
        log_z = log_partition(log_target - log_q, group, num_groups)[group]
    log_p = log_target - log_z.double()
    ratio = torch.exp(log_p - log_q)            # p/q
    log_t = log_pi - log_p                      # log π/p
    inside = ratio > 0
    outside = torch.isneginf(log_target) & ~torch.isneginf(log_pi)
    zero = torch.zeros_like(ratio)
    out = {}
    for name in names:
        gen = divergences.get(name)
        f_t = gen.f(log_t)
        terms = torch.where(inside, ratio * f_t, zero)
        if outside.any():
            slope = divergences.SLOPE_AT_INFINITY[name]
            terms = torch.where(outside, torch.exp(log_pi - log_q) * slope if slope > 0 else zero, terms)
        est = _mean_and_stderr(terms, group, num_groups)
        if self_normalised:
            t_f_prime = torch.where(torch.isfinite(log_t), torch.exp(log_t) * gen.f_prime(log_t), zero)
            c = group_mean(torch.where(inside, ratio * (t_f_prime - f_t), zero), group, num_groups)
            influence = torch.where(inside, ratio * (f_t + c[group]), terms)
            est = Estimate(est.value, _mean_and_stderr(influence, group, num_groups).stderr)
        out[name] = est
    return out


def kl_from_samples(log_pi: torch.Tensor, log_ref: torch.Tensor, group: torch.Tensor, num_groups: int) -> Estimate:
    """``KL(π‖ref)`` from samples of π: the mean of ``log π − log ref``."""
    return _mean_and_stderr((log_pi - log_ref).detach().double(), group, num_groups)
