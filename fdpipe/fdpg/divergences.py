"""f-divergence generators, written as functions of ``log t``.

For a target distribution ``p`` and a policy ``π``, ``D_f(π‖p) = E_p[f(π/p)]`` with a
convex ``f`` and ``f(1) = 0``. f-DPG minimises it with the gradient
``E_π[f′(π/p) ∇ log π]``, so each sample receives the *pseudo-reward* ``−f′(π(x)/p(x))``.

Ratios of sequence probabilities under- and overflow easily, so every function here takes
``log_t = log π(x) − log p(x)`` and stays finite wherever the closed form is finite:

=======  =============================  ===========================  ==================
name     f(t)                           f′(t)                        known as
=======  =============================  ===========================  ==================
rkl      t log t                        log t + 1                    RLHF (reverse KL)
fkl      −log t                         −1/t                         GDC / DPG
js       ½[t log t − (1+t) log((1+t)/2)] ½ log(2t/(1+t))             Jensen–Shannon
tv       ½|t − 1|                       ½ sign(t − 1)                total variation
chi2     (t − 1)²                       2(t − 1)                     Pearson χ²
rchi2    (1 − t)²/t                     1 − 1/t²                     Neyman χ²
=======  =============================  ===========================  ==================

``D_rkl(π‖p) = KL(π‖p)`` and ``D_fkl(π‖p) = KL(p‖π)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Generator:
    """A divergence generator ``f`` with its derivative, both as functions of ``log t``."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    f_prime: Callable[[torch.Tensor], torch.Tensor]
    description: str

    def pseudo_reward(self, log_t: torch.Tensor) -> torch.Tensor:
        """``−f′(t)``: what each sample is rewarded with in the f-DPG update."""
        return -self.f_prime(log_t)


def _rkl_f(log_t):
    # t log t; exp(log t) * log t is 0 at log t = -inf (limit), guard the 0 * inf.
    t = torch.exp(log_t)
    return torch.where(torch.isneginf(log_t), torch.zeros_like(t), t * log_t)


def _js_f(log_t):
    # ½[t log t − (1+t)(log(1+t) − log 2)], log(1+t) = softplus(log t)
    t = torch.exp(log_t)
    return 0.5 * (_rkl_f(log_t) - (1.0 + t) * (F.softplus(log_t) - _LOG2))


def _js_f_prime(log_t):
    # ½ log(2t/(1+t)) = ½[log 2 + log t − softplus(log t)] = ½[log 2 − softplus(−log t)]
    return 0.5 * (_LOG2 - F.softplus(-log_t))


GENERATORS: dict[str, Generator] = {
    g.name: g
    for g in (
        Generator("rkl", _rkl_f, lambda lt: lt + 1.0, "reverse KL, KL(π‖p): RLHF"),
        Generator("fkl", lambda lt: -lt, lambda lt: -torch.exp(-lt), "forward KL, KL(p‖π): GDC/DPG"),
        Generator("js", _js_f, _js_f_prime, "Jensen–Shannon"),
        Generator("tv", lambda lt: 0.5 * torch.abs(torch.expm1(lt)), lambda lt: 0.5 * torch.sign(lt),
                  "total variation"),
        Generator("chi2", lambda lt: torch.expm1(lt) ** 2, lambda lt: 2.0 * torch.expm1(lt), "Pearson χ²"),
        Generator("rchi2", lambda lt: torch.expm1(lt) ** 2 * torch.exp(-lt), lambda lt: -torch.expm1(-2.0 * lt),
                  "Neyman (reverse) χ²"),
    )
}

NAMES: tuple[str, ...] = tuple(GENERATORS)

# lim_{t→∞} f(t)/t: what a unit of π-mass where p = 0 contributes to D_f(π‖p).
SLOPE_AT_INFINITY: dict[str, float] = {"rkl": math.inf, "fkl": 0.0, "js": 0.5 * _LOG2, "tv": 0.5,
                                       "chi2": math.inf, "rchi2": 1.0}


def get(name: str) -> Generator:
    """The generator called `name`; a clear error lists the valid names."""
    try:
        return GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; expected one of {', '.join(NAMES)}") from None


def f(name: str, log_t: torch.Tensor) -> torch.Tensor:
    return get(name).f(log_t)


def f_prime(name: str, log_t: torch.Tensor) -> torch.Tensor:
    return get(name).f_prime(log_t)


def exact(name: str, log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``D_f(π‖p) = Σ_x p(x) f(π(x)/p(x))`` over an enumerated space (normalised log-probs).

    Points where ``p = 0`` contribute ``π(x) · lim_{t→∞} f(t)/t`` (the convex-conjugate
    convention), which is ``+∞`` for rkl and chi2, ``½`` per unit mass for tv, ``½ log 2`` for
    js, ``1`` for rchi2 and ``0`` for fkl.
    """
    gen = get(name)
    support = ~torch.isneginf(log_p)
    log_t = torch.where(support, log_pi - log_p, torch.zeros_like(log_pi))
    inside = torch.where(support, torch.exp(log_p) * gen.f(log_t), torch.zeros_like(log_p)).sum()
    outside_mass = torch.where(support, torch.zeros_like(log_pi), torch.exp(log_pi)).sum()
    if outside_mass == 0:
        return inside
    return inside + outside_mass * SLOPE_AT_INFINITY[name]
