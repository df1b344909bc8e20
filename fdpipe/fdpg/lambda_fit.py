"""λ of a distributional target: ``p_λ(x|c) ∝ w(x) · exp(λ·φ(x))`` with ``E_p[φ] = μ̄``.

Both fits minimise the convex dual ``mean_c log Σ_{i∈c} w_i e^{λ·φ_i} − λ·μ̄`` by Newton's
method on given points: samples of ``a`` (``w = 1``: self-normalised importance sampling) or
the whole enumerable space (``w = a``: exact). With groups (the prompt of each point) the
target is conditional, each prompt normalised on its own, and the matched moment is the
average over prompts. The dual's gradient is the moment error, its Hessian the mean per-prompt
covariance of φ under ``p_λ``; steps are halved until the dual decreases.

* `fit_lambda`: one feature (scalar λ), the fit of the single-reward targets;
* `fit_lambdas`: ``d`` features at once (vector λ), the fit of targets over named features.

A moment outside what the points allow raises `UnreachableMoment` naming the constraint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fdpipe.fdpg.estimators import group_logsumexp


class UnreachableMoment(ValueError):
    """A requested moment no λ reaches on the fitting points; `index` is the constraint's and
    `hint` says what would help."""

    def __init__(self, index: int, message: str, hint: str = "use more samples or a moment inside that range"):
        self.index, self.hint = index, hint
        super().__init__(message)


@dataclass
class LambdaFit:
    lam: float | tuple           # fitted λ (a tuple for `fit_lambdas`)
    moment: float | tuple        # E_p[φ] under the fitted λ, on the fitting points
    error: float                 # largest |moment − requested|
    iterations: int


def _groups(phi: torch.Tensor, group):
    group = torch.zeros(phi.shape[0], dtype=torch.long) if group is None else group.reshape(-1).long()
    return group.to(phi.device), int(group.max().item()) + 1


def _ranges(phi: torch.Tensor, alive: torch.Tensor, group: torch.Tensor, num_groups: int):
    """Mean over prompts of the per-prompt min and max of each column of ``phi`` [N, d]."""
    inf = torch.tensor(math.inf, dtype=phi.dtype, device=phi.device)
    shape = (num_groups, phi.shape[1])
    index = group[:, None].expand_as(phi)
    lo = torch.full(shape, math.inf, dtype=phi.dtype, device=phi.device).scatter_reduce(
        0, index, torch.where(alive[:, None], phi, inf), reduce="amin")
    hi = torch.full(shape, -math.inf, dtype=phi.dtype, device=phi.device).scatter_reduce(
        0, index, torch.where(alive[:, None], phi, -inf), reduce="amax")
    present = torch.isfinite(lo[:, 0])
    return lo[present].mean(0), hi[present].mean(0), present


def fit_lambda(phi: torch.Tensor, log_weights: torch.Tensor, moment: float, *, group: torch.Tensor | None = None,
               tol: float = 1e-4, max_iter: int = 100) -> LambdaFit:
    """Fit a scalar ``λ`` so that ``E_{p_λ}[φ] = moment`` with ``p_λ ∝ w · exp(λφ)`` on given points.

    ``phi`` are the features of points ``x_i`` and ``log_weights`` their log-weights (see the
    module docstring); ``group`` the prompt index of each point (all one group without it).
    """
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
        raise UnreachableMoment(0, f"moment {moment} is not reachable: on the fitting samples the moment can only "
                                   f"lie in ({lo:g}, {hi:g}); use more samples or a moment strictly inside that range")

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


def fit_lambdas(phi: torch.Tensor, log_weights: torch.Tensor, moments, *, group: torch.Tensor | None = None,
                tol: float = 1e-4, max_iter: int = 200, names=None) -> LambdaFit:
    """Fit a vector ``λ`` so that ``E_{p_λ}[φ_k] = moments[k]`` for every column k of ``phi`` [N, d].

    Arithmetic in float64. Each moment must lie strictly between the mean over prompts of the
    per-prompt smallest and largest value of its feature on the points with positive weight;
    otherwise, or when Newton's method does not bring every error below `tol` within
    `max_iter` iterations (the moments are then not reachable together), `UnreachableMoment`
    names the constraint (``names[k]`` when given) with the largest error.
    """
    phi = phi.detach().double()
    phi = phi[:, None] if phi.dim() == 1 else phi
    logw = log_weights.detach().double().reshape(-1).to(phi.device)
    target = torch.as_tensor(moments, dtype=torch.float64, device=phi.device).reshape(-1)
    if target.numel() != phi.shape[1]:
        raise ValueError(f"{target.numel()} moments for {phi.shape[1]} features")
    names = list(names) if names is not None else [f"feature {k}" for k in range(phi.shape[1])]
    group, num_groups = _groups(phi, group)
    alive = logw > -math.inf
    lo, hi, present = _ranges(phi, alive, group, num_groups)
    for k in range(phi.shape[1]):
        if not lo[k] < target[k] < hi[k]:
            raise UnreachableMoment(k, f"E_p[{names[k]}] can only lie in ({lo[k].item():g}, {hi[k].item():g}) on "
                                       f"the fitting samples")
    phi_alive = torch.where(alive[:, None], phi, torch.zeros_like(phi))   # 0·(−inf) never appears

    def log_norm(lam):
        return group_logsumexp(logw + phi_alive @ lam, group, num_groups)

    def dual(lam):
        return (log_norm(lam)[present].mean() - lam @ target).item()

    def stats(lam):
        w = torch.exp(logw + phi_alive @ lam - log_norm(lam)[group])                  # sums to 1 per prompt
        mean_c = torch.zeros(num_groups, phi.shape[1], dtype=phi.dtype, device=phi.device).index_add_(
            0, group, w[:, None] * phi_alive)
        centred = phi_alive - mean_c[group]
        cov_c = torch.zeros(num_groups, phi.shape[1], phi.shape[1], dtype=phi.dtype, device=phi.device).index_add_(
            0, group, w[:, None, None] * centred[:, :, None] * centred[:, None, :])
        return mean_c[present].mean(0), cov_c[present].mean(0)

    lam = torch.zeros(phi.shape[1], dtype=torch.float64, device=phi.device)
    it, converged = 0, False
    for it in range(1, max_iter + 1):
        mean, cov = stats(lam)
        err = mean - target
        if err.abs().max().item() < tol:
            converged = True
            break
        step = torch.linalg.pinv(cov, hermitian=True, rtol=1e-12) @ err    # minimum-norm Newton step
        current, scale = dual(lam), 1.0
        while dual(lam - scale * step) > current and scale > 1e-12:
            scale /= 2
        lam = lam - scale * step
    mean, _ = stats(lam)
    errors = (mean - target).abs()
    if not converged and errors.max().item() >= tol:
        k = int(errors.argmax())
        raise UnreachableMoment(k, f"E_p[{names[k]}] stops at {mean[k].item():.4g} for the requested "
                                   f"{target[k].item():g}: the moments are not reachable together on the fitting "
                                   "samples", hint="use more samples or moments nearer those of the base")
    return LambdaFit(lam=tuple(lam.tolist()), moment=tuple(mean.tolist()), error=errors.max().item(), iterations=it)
