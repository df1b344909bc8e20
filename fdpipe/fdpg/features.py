"""Feature values ``φ(x)`` of samples: one float64 column per feature, computed in batches.

`FeatureScorer` turns the `fdpipe.common.feature_specs.FeatureSpec` of a target into a
``[B, K]`` table for a batch of texts (columns in the target's feature order). Every feature
reads the batch once: regexes and word lists per text, a classifier in batches of its
``batch_size``, a user's callable on lists of at most ``batch_size`` texts, and the reward
feature the rewards the caller already computed. A callable that returns anything else than
one finite number per text stops with a `ConfigError` naming its key.
"""
from __future__ import annotations

import numpy as np
import torch

from fdpipe.common.errors import ConfigError
from fdpipe.common.feature_specs import FeatureSpec
from fdpipe.common.imports import load_callable


def as_scores(values, count: int, key: str) -> np.ndarray:
    """A callable's output as a float64 vector of `count` finite numbers, or ConfigError."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        out = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(key, f"a function returning one number per text ({count} for {count} texts)",
                          f"a {type(values).__name__} of non-numbers") from None
    if out.shape != (count,):
        raise ConfigError(key, f"a function returning one number per text (shape ({count},) for {count} texts)",
                          f"shape {out.shape}")
    if not np.isfinite(out).all():
        bad = out[~np.isfinite(out)][0]
        raise ConfigError(key, "a function returning finite numbers", f"{bad} for text {int(np.argmax(~np.isfinite(out)))}")
    return out


class FeatureScorer:
    """φ of every feature of `specs` for batches of samples (`__call__`) or texts (`values`).

    Classifiers and callables are loaded when the scorer is built, so a missing model or an
    unimportable function stops before any sampling. `device` is where classifiers run.
    """

    def __init__(self, specs, *, device="cpu"):
        self.specs: list[FeatureSpec] = list(specs)
        self._readers = [self._reader(spec, device) for spec in self.specs]

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    @staticmethod
    def _reader(spec: FeatureSpec, device):
        if spec.kind == "reward":
            return None
        if spec.kind in ("regex", "words"):
            pattern = spec.regex()
            return lambda texts: np.fromiter((pattern.search(t) is not None for t in texts), dtype=np.float64,
                                             count=len(texts))
        if spec.kind == "classifier":
            from fdpipe.models.classifier import TextClassifier

            classifier = TextClassifier.load(spec.model, device, key=f"{spec.key}.model")
            index = classifier.label_index(spec.label, key=f"{spec.key}.label")
            return lambda texts: classifier.probabilities(texts, index, spec.batch_size).numpy()
        function = load_callable(spec.function, f"{spec.key}.function")

        def call(texts):
            parts = [as_scores(function(list(texts[i:i + spec.batch_size])), len(texts[i:i + spec.batch_size]),
                               f"{spec.key}.function") for i in range(0, len(texts), spec.batch_size)]
            return np.concatenate(parts) if parts else np.zeros(0)
        return call

    def values(self, *, texts: list[str], completions: list[str], reward) -> torch.Tensor:
        """``[B, K]`` float64 CPU tensor: column k is φ_k of each sample.

        `texts` are prompt + completion, `completions` the completions alone (a feature reads
        one of them, per its ``scope``); `reward` the rewards the targets see (for reward features).
        """
        count = len(texts)
        if len(completions) != count:
            raise ValueError(f"{count} texts but {len(completions)} completions")
        columns = []
        for spec, reader in zip(self.specs, self._readers):
            if reader is None:
                score = torch.as_tensor(reward).detach().double().cpu().numpy().reshape(-1)
                if score.shape != (count,):
                    raise ValueError(f"feature {spec.name}: {score.shape[0]} rewards for {count} texts")
            else:
                score = reader(list(texts) if spec.scope == "text" else list(completions))
            if spec.threshold is not None:
                score = (score >= spec.threshold).astype(np.float64)
            columns.append(np.asarray(score, dtype=np.float64))
        if not columns:
            return torch.zeros((count, 0), dtype=torch.float64)
        return torch.from_numpy(np.stack(columns, axis=1))

    def __call__(self, samples, reward) -> torch.Tensor:
        """φ of a `fdpipe.models.policy.Samples` batch (decoded texts needed), on `reward`'s device."""
        if samples.texts is None or samples.completions is None:
            raise ValueError("features read decoded texts: sample with a policy that has a tokenizer")
        phi = self.values(texts=samples.texts, completions=samples.completions, reward=reward)
        return phi.to(reward.device if isinstance(reward, torch.Tensor) else "cpu")
