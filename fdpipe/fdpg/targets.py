"""Targets of f-DPG: energy-based models ``P(x|c) = a(x|c) · exp(log_potential(x))``.

The normalised target is ``p(x|c) = P(x|c) / Z(c)``. A target is written either over named
features of the text (``features``, GDC as its users write it) or, as before features
existed, over the proxy reward ``r(x)`` alone.

Over features ``φ_1..φ_K`` (`fdpipe.common.feature_specs`; each use a condition or a moment):

* ``pointwise``: ``P = a · Π_k b_k`` over binary features, each ``b_k`` floored at its own
  ``epsilon`` (``0``: a hard zero), i.e. a conjunction;
* ``distributional``: ``P = a · Π_conditions b_k · exp(λ·φ)`` with ``φ`` the features that
  request a moment and ``λ`` fitted jointly so that ``E_p[φ_k] = moment_k`` for every k
  (`fdpipe.fdpg.lambda_fit.fit_lambdas`; the conditions, when there are any, are part of
  the base the moments are matched on);
* ``rlhf``: ``P = a · exp(r/β) · Π_k b_k``, the rlhf tilt times pointwise conditions.

Over the reward alone (no ``features``):

* ``rlhf``: ``P = a · exp(r/β)``, the optimum of KL-regularised reward maximisation;
* ``pointwise``: ``P = a · b`` with ``b(x) = 1[r(x) ≥ threshold]`` floored at ``epsilon``;
* ``distributional``: ``P = a · exp(λ·φ(x))`` with ``φ(x) = 1[r(x) ≥ threshold]``
  (``feature: indicator``) or ``φ(x) = r(x)`` (``feature: reward``) and scalar ``λ``
  (`fdpipe.fdpg.lambda_fit.fit_lambda`).

Potentials take the rewards ``[B]`` and, for a target over features, the feature table
``phi`` ``[B, K]`` whose columns follow `Target.feature_names`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fdpipe.common.errors import ConfigError
from fdpipe.common.feature_specs import REGISTRY, FeatureUse, parse_definitions, parse_uses
from fdpipe.fdpg.lambda_fit import LambdaFit, UnreachableMoment, fit_lambda, fit_lambdas  # noqa: F401

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
    lam: float | tuple | None = None   # fitted λ of `distributional` (a tuple over the moment features)
    features: tuple = ()               # FeatureUse of a target over features, in config order
    key: str = field(default="target", compare=False)   # config key, named in errors

    @classmethod
    def from_config(cls, cfg: dict, key: str = "target", definitions: dict | None = None,
                    definitions_key: str = REGISTRY) -> "Target":
        """Build from a config mapping; errors name ``<key>.<field>``.

        `definitions` maps the names of ``cfg["features"]`` to their definitions (the
        ``alignment.features`` entries; errors name ``<definitions_key>.<name>``).
        """
        kind = cfg.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind", f"one of {', '.join(KINDS)}", kind)
        target = cls(kind=kind, beta=float(cfg.get("beta", 1.0)), threshold=float(cfg.get("threshold", 0.0)),
                     epsilon=float(cfg.get("epsilon", 1e-3)), feature=cfg.get("feature", "indicator"),
                     moment=float(cfg.get("moment", 0.5)), lam=cfg.get("lambda"), key=key)
        if kind == "rlhf" and not target.beta > 0:
            raise ConfigError(f"{key}.beta", "a positive number", target.beta)
        if kind == "pointwise" and not 0 <= target.epsilon < 1:
            raise ConfigError(f"{key}.epsilon", "a number in [0, 1)", target.epsilon)
        if cfg.get("features") is not None:
            specs = parse_definitions(definitions or {}, definitions_key)
            target.features = parse_uses(kind, cfg["features"], specs, key, default_epsilon=target.epsilon)
            if target.lam is not None:
                lam = target.lam
                if not isinstance(lam, (list, tuple)) or len(lam) != len(target.moment_uses):
                    raise ConfigError(f"{key}.lambda", f"a list of {len(target.moment_uses)} numbers", lam)
                target.lam = tuple(float(v) for v in lam)
            return target
        if kind == "distributional":
            if target.feature not in FEATURES:
                raise ConfigError(f"{key}.feature", f"one of {', '.join(FEATURES)}", target.feature)
            if target.feature == "indicator" and not 0 < target.moment < 1:
                raise ConfigError(f"{key}.moment", "a fraction strictly between 0 and 1", target.moment)
        return target

    # ------------------------------------------------------------------ features
    @property
    def over_features(self) -> bool:
        return bool(self.features)

    @property
    def feature_specs(self) -> list:
        return [use.spec for use in self.features]

    @property
    def feature_names(self) -> list[str]:
        return [use.name for use in self.features]

    @property
    def moment_uses(self) -> list[FeatureUse]:
        return [use for use in self.features if not use.is_condition]

    @property
    def condition_uses(self) -> list[FeatureUse]:
        return [use for use in self.features if use.is_condition]

    def requested(self) -> dict[str, float]:
        """Feature name → requested moment (moment uses only)."""
        return {use.name: use.moment for use in self.moment_uses}

    def lambdas(self) -> dict[str, float]:
        """Feature name → fitted λ_k of a distributional target over features (empty before the fit)."""
        if self.lam is None or not self.over_features:
            return {}
        return dict(zip((use.name for use in self.moment_uses), self.lam))

    def _columns(self, phi: torch.Tensor, uses) -> torch.Tensor:
        index = [self.features.index(use) for use in uses]
        return phi[:, index].double()

    def condition_log_potential(self, phi: torch.Tensor) -> torch.Tensor:
        """``Σ_k log b_k(x)`` over the conditions: 0 where met, ``log ε_k`` (``−inf`` for ε = 0) where not."""
        out = torch.zeros(phi.shape[0], dtype=torch.float64, device=phi.device)
        for use in self.condition_uses:
            met = self._columns(phi, [use])[:, 0] >= 0.5
            floor = math.log(use.epsilon) if use.epsilon > 0 else -math.inf
            out = out + torch.where(met, torch.zeros_like(out), torch.full_like(out, floor))
        return out

    def moment_features(self, phi: torch.Tensor) -> torch.Tensor:
        """The columns of `phi` whose moments a distributional target requests ``[B, d]``."""
        return self._columns(phi, self.moment_uses)

    # ------------------------------------------------------------------ scores
    def constraint(self, reward: torch.Tensor, phi: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample value whose mean is the target's constraint.

        Over the reward: ``b(x)`` (pointwise), ``φ(x)`` (distributional), ``r(x)`` (rlhf). Over
        features: ``Π_k b_k`` (pointwise: every condition met), ``r(x)`` (rlhf), NaN for
        distributional (each feature's moment is reported on its own).
        """
        if self.kind == "rlhf":
            return reward
        if self.over_features:
            if self.kind == "distributional":
                return torch.full_like(reward, math.nan, dtype=torch.float64)
            met = self._columns(phi, self.condition_uses) >= 0.5
            return met.all(dim=1).to(torch.float64).to(reward.device)
        if self.kind == "distributional" and self.feature == "reward":
            return reward
        return (reward >= self.threshold).to(reward.dtype)

    def log_potential(self, reward: torch.Tensor, phi: torch.Tensor | None = None) -> torch.Tensor:
        """``log P(x|c) − log a(x|c)``; `phi` ``[B, K]`` is required for a target over features."""
        if self.over_features:
            if phi is None or phi.shape != (reward.shape[0], len(self.features)):
                raise ValueError(f"a target over {len(self.features)} features needs their values [B, K]")
            out = self.condition_log_potential(phi.to(reward.device))
            if self.kind == "rlhf":
                out = reward.double() / self.beta + out
            if self.kind == "distributional":
                if self.lam is None:
                    raise RuntimeError("distributional target used before its λ was fitted (call fit_lambdas)")
                lam = torch.tensor(self.lam, dtype=torch.float64, device=reward.device)
                out = out + self.moment_features(phi.to(reward.device)) @ lam
            return out
        if self.kind == "rlhf":
            return reward / self.beta
        if self.kind == "pointwise":
            floor = math.log(self.epsilon) if self.epsilon > 0 else -math.inf
            return torch.where(reward >= self.threshold, torch.zeros_like(reward), torch.full_like(reward, floor))
        if self.lam is None:
            raise RuntimeError("distributional target used before its λ was fitted (call fit_lambda)")
        return self.lam * self.constraint(reward)

    def fit(self, reward: torch.Tensor, phi: torch.Tensor | None, log_weights: torch.Tensor, *,
            group: torch.Tensor | None = None, tol: float = 1e-4, what: str = "fitting samples") -> LambdaFit:
        """Fit λ on points with `log_weights` (see `fdpipe.fdpg.lambda_fit`) and set it.

        A moment that cannot be reached raises `ConfigError` naming its config key; `what`
        says which points the fit used.
        """
        try:
            if not self.over_features:
                fit = fit_lambda(self.constraint(reward.double()), log_weights, self.moment, group=group, tol=tol)
            else:
                names = [use.name for use in self.moment_uses]
                fit = fit_lambdas(self.moment_features(phi), log_weights + self.condition_log_potential(phi),
                                  [use.moment for use in self.moment_uses], group=group, tol=tol, names=names)
        except UnreachableMoment as exc:
            if not self.over_features:
                raise ConfigError(f"{self.key}.moment", f"a moment reachable on the {what} ({exc})",
                                  self.moment) from None
            use = self.moment_uses[exc.index]
            hint = exc.hint.replace("more samples", "more fit_samples")
            raise ConfigError(f"{use.key}.moment", f"a moment reachable on the {what} ({exc}; {hint})",
                              use.moment) from None
        self.lam = fit.lam
        return fit

    # ------------------------------------------------------------------ description
    def describe(self) -> str:
        if self.over_features:
            parts = [f"beta={self.beta:g}"] if self.kind == "rlhf" else []
            for use in self.features:
                parts.append(f"{use.name}[eps={use.epsilon:g}]" if use.is_condition else f"E[{use.name}]={use.moment:g}")
            if self.kind == "distributional":
                lam = "unfitted" if self.lam is None else "(" + ", ".join(f"{v:.4g}" for v in self.lam) + ")"
                parts.append(f"lambda={lam}")
            return f"{self.kind}({', '.join(parts)})"
        if self.kind == "rlhf":
            return f"rlhf(beta={self.beta:g})"
        if self.kind == "pointwise":
            return f"pointwise(r>={self.threshold:g}, eps={self.epsilon:g})"
        lam = "unfitted" if self.lam is None else f"{self.lam:.4g}"
        return f"distributional({self.feature}, moment={self.moment:g}, lambda={lam})"

    def as_dict(self) -> dict:
        """The target's settings (what provenance records): `to_config` over features, else the
        fields of a target over the reward."""
        if self.over_features:
            return self.to_config()
        return {name: getattr(self, name) for name in ("kind", "beta", "threshold", "epsilon", "feature", "moment",
                                                       "lam")}

    def to_config(self) -> dict:
        """The config of a target over features, with the definitions of its features
        (what ``target.json`` holds; `from_config` reads it back)."""
        out = {"kind": self.kind}
        if self.kind == "rlhf":
            out["beta"] = self.beta
        out["features"] = {use.name: use.to_config() for use in self.features}
        out["feature_definitions"] = {use.name: use.spec.definition() for use in self.features}
        out["lambda"] = list(self.lam) if self.lam is not None else None
        return out
