"""Targets of f-DPG: energy-based models ``P(x|c) = a(x|c) · exp(log_potential(x))``.

The normalised target is ``p(x|c) = P(x|c) / Z(c)``. Every kind is defined from a scalar
score ``r(x)`` (the proxy reward of the language-model pipeline, a table in the toy space):

* ``rlhf``: ``P = a · exp(r/β)``, the optimum of KL-regularised reward maximisation;
* ``pointwise`` (GDC): ``P = a · b`` with ``b(x) = 1[r(x) ≥ threshold]``. A hard zero makes
  every divergence whose ``f`` grows faster than linearly infinite at ``π = a``, so ``b`` is
  floored at ``epsilon`` (``epsilon = 0`` gives the hard constraint);
* ``distributional`` (GDC): ``P = a · exp(λ·φ(x))`` with ``φ(x) = 1[r(x) ≥ threshold]``
  (``feature: indicator``) or ``φ(x) = r(x)`` (``feature: reward``), and ``λ`` fitted so that
  ``E_p[φ] = moment`` (see `fit_lambda`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdpipe.common.errors import ConfigError

KINDS = ("rlhf", "pointwise", "distributional")
FEATURES = ("indicator", "reward")


@dataclass
class Target:
    kind: str
    beta: float = 1.0
    threshold: float = 0.0
    epsilon: float = 1e-3
    feature: str = "indicator"
    moment: float = 0.5
    lam: float | None = None   # fitted λ for `distributional`

    @classmethod
    def from_config(cls, cfg: dict, key: str = "target") -> "Target":
        """Build from a config mapping; errors name ``<key>.<field>``."""
        kind = cfg.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind", f"one of {', '.join(KINDS)}", kind)
        target = cls(kind=kind, beta=float(cfg.get("beta", 1.0)), threshold=float(cfg.get("threshold", 0.0)),
                     epsilon=float(cfg.get("epsilon", 1e-3)), feature=cfg.get("feature", "indicator"),
                     moment=float(cfg.get("moment", 0.5)), lam=cfg.get("lambda"))
        if kind == "rlhf" and not target.beta > 0:
            raise ConfigError(f"{key}.beta", "a positive number", target.beta)
        if kind == "pointwise" and not 0 <= target.epsilon < 1:
            raise ConfigError(f"{key}.epsilon", "a number in [0, 1)", target.epsilon)
        if kind == "distributional":
            if target.feature not in FEATURES:
                raise ConfigError(f"{key}.feature", f"one of {', '.join(FEATURES)}", target.feature)
            if target.feature == "indicator" and not 0 < target.moment < 1:
                raise ConfigError(f"{key}.moment", "a fraction strictly between 0 and 1", target.moment)
        return target

    # ------------------------------------------------------------------ scores
    def constraint(self, reward: torch.Tensor) -> torch.Tensor:
        """``b(x)`` (pointwise), ``φ(x)`` (distributional) or the reward itself (rlhf)."""
        if self.kind == "rlhf":
            return reward
        if self.kind == "distributional" and self.feature == "reward":
            return reward
        return (reward >= self.threshold).to(reward.dtype)

    def log_potential(self, reward: torch.Tensor) -> torch.Tensor:
        """``log P(x|c) − log a(x|c)``."""
        if self.kind == "rlhf":
            return reward / self.beta
        if self.kind == "pointwise":
            floor = math.log(self.epsilon) if self.epsilon > 0 else -math.inf
            return torch.where(reward >= self.threshold, torch.zeros_like(reward), torch.full_like(reward, floor))
        if self.lam is None:
            raise RuntimeError("distributional target used before its λ was fitted (call fit_lambda)")
        return self.lam * self.constraint(reward)

    def describe(self) -> str:
        if self.kind == "rlhf":
            return f"rlhf(beta={self.beta:g})"
        if self.kind == "pointwise":
            return f"pointwise(r>={self.threshold:g}, eps={self.epsilon:g})"
        lam = "unfitted" if self.lam is None else f"{self.lam:.4g}"
        return f"distributional({self.feature}, moment={self.moment:g}, lambda={lam})"


@dataclass
class LambdaFit:
    lam: float
    moment: float          # E_p[φ] under the fitted λ, on the fitting samples
    error: float           # |moment − requested|
    iterations: int


def fit_lambda(phi: torch.Tensor, log_weights: torch.Tensor, moment: float, *, group: torch.Tensor | None = None,
               tol: float = 1e-4, max_iter: int = 100) -> LambdaFit:
    """Fit ``λ`` so that ``E_{p_λ}[φ] = moment`` with ``p_λ ∝ w · exp(λφ)`` on given points.

    ``phi`` are the features of points ``x_i`` and ``log_weights`` their log-weights: zeros for
    samples drawn from ``a`` (self-normalised importance sampling), or ``log a(x)`` for an
    enumeration of the whole space (exact). With ``group`` (the prompt index of each point)
    the target is conditional, ``p_λ(x|c) ∝ w · exp(λφ)`` normalised within each prompt, and
    the matched moment is the average over prompts ``mean_c E_{p_λ(·|c)}[φ]``; without it all
    points form one group. Newton's method on the convex dual
    ``mean_c log Σ_{i∈c} w_i e^{λφ_i} − λ·moment``, whose gradient is the moment error and
    whose curvature is the mean per-prompt variance of φ under ``p_λ``; steps are halved until
    the dual decreases.
    """
    from fdpipe.fdpg.estimators import group_logsumexp  # local: estimators does not depend on targets

    phi = phi.detach().double().reshape(-1)
    logw = log_weights.detach().double().reshape(-1)
    group = torch.zeros_like(phi, dtype=torch.long) if group is None else group.reshape(-1).long().to(phi.device)
    num_groups = int(group.max().item()) + 1
    alive = logw > -math.inf
    inf = torch.tensor(math.inf, dtype=phi.dtype, device=phi.device)
    group_min = torch.full((num_groups,), math.inf, dtype=phi.dtype, device=phi.device).scatter_reduce(
        0, group, torch.where(alive, phi, inf), reduce="amin")
    group_max = torch.full((num_groups,), -math.inf, dtype=phi.dtype, device=phi.device).scatter_reduce(
        0, group, torch.where(alive, phi, -inf), reduce="amax")
    present = torch.isfinite(group_min)
    lo, hi = group_min[present].mean().item(), group_max[present].mean().item()
    if not lo < moment < hi:
        raise ValueError(f"moment {moment} is not reachable: on the fitting samples the moment can only lie in "
                         f"({lo:g}, {hi:g}); use more samples or a moment strictly inside that range")

    def dual(lam):
        return group_logsumexp(logw + lam * phi, group, num_groups)[present].mean().item() - lam * moment

    def moments(lam):
        log_norm = group_logsumexp(logw + lam * phi, group, num_groups)
        w = torch.exp(logw + lam * phi - log_norm[group])          # sums to 1 within each group
        mean_c = torch.zeros(num_groups, dtype=phi.dtype, device=phi.device).index_add_(0, group, w * phi)
        var_c = torch.zeros_like(mean_c).index_add_(0, group, w * (phi - mean_c[group]) ** 2)
        return mean_c[present].mean().item(), var_c[present].mean().item()

    lam, it = 0.0, 0
    for it in range(1, max_iter + 1):
        mean, var = moments(lam)
        err = mean - moment
        if abs(err) < tol:
            break
        step, current = err / max(var, 1e-12), dual(lam)
        while dual(lam - step) > current and abs(step) > 1e-12:
            step /= 2
        lam -= step
    mean, _ = moments(lam)
    return LambdaFit(lam=lam, moment=mean, error=abs(mean - moment), iterations=it)
