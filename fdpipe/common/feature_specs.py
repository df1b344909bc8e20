"""Named features of a text and how a target uses them: config parsing and checks.

A feature ``φ(x)`` is defined once under ``alignment.features.<name>`` and used by name in a
run's ``target.features``. Kinds (`KINDS`):

* ``reward``: the proxy reward (standardised, as targets see it); binary with ``threshold``;
* ``regex``: 1 when ``pattern`` matches somewhere (``re.search``) in the completion or, with
  ``scope: text``, in prompt + completion; ``ignore_case`` (default false);
* ``words``: 1 when one of ``words`` occurs as a whole word; ``ignore_case`` (default true);
* ``classifier``: the probability a Hugging Face text-classification ``model`` (folder or
  name) gives to ``label`` (softmax; sigmoid for a one-logit head); binary with ``threshold``;
* ``callable``: a user's ``module:function`` mapping a list of texts to one float each;
  binary with ``threshold``.

A feature with ``threshold`` is ``1[score ≥ threshold]``. A use is either a pointwise
condition (``epsilon``: the floor of ``b(x)``, 0 for a hard zero; the feature must be binary)
or, in a distributional target, a requested moment (``moment``: ``E_p[φ]``, inside (0, 1) for
a binary feature). Nothing here imports torch: the workflow checks every spec when it builds
the DAG (`check_features`), before any job runs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fdpipe.common.errors import ConfigError

KINDS = ("reward", "regex", "words", "classifier", "callable")
SCOPES = ("completion", "text")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
REGISTRY = "alignment.features"
DEFAULT_EPSILON = 1e-3

# the keys each kind reads (besides `kind`); a key another kind reads is refused
_KEYS = {
    "reward": {"threshold"},
    "regex": {"pattern", "scope", "ignore_case"},
    "words": {"words", "scope", "ignore_case"},
    "classifier": {"model", "label", "threshold", "scope", "batch_size"},
    "callable": {"function", "threshold", "scope", "batch_size"},
}
_ALL_KEYS = {"kind"} | set().union(*_KEYS.values())


@dataclass(frozen=True)
class FeatureSpec:
    """One named feature (see the module docstring); `key` is where it is defined."""

    name: str
    kind: str
    scope: str = "completion"
    threshold: float | None = None
    pattern: str | None = None
    words: tuple = ()
    ignore_case: bool = False
    model: str | None = None
    label: str | int | None = None
    function: str | None = None
    batch_size: int = 32
    key: str = field(default="", compare=False)

    @property
    def binary(self) -> bool:
        """Whether φ only takes the values 0 and 1."""
        return self.kind in ("regex", "words") or self.threshold is not None

    def regex(self) -> re.Pattern:
        """The compiled pattern of a regex or words feature."""
        flags = re.IGNORECASE if self.ignore_case else 0
        if self.kind == "words":
            return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in self.words) + r")\b", flags)
        return re.compile(self.pattern, flags)

    def definition(self) -> dict:
        """The config mapping of this feature (only the keys its kind reads)."""
        out = {"kind": self.kind}
        for name in sorted(_KEYS[self.kind]):
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_config(cls, name: str, cfg, key: str | None = None) -> "FeatureSpec":
        """Parse and check ``alignment.features.<name>``; errors name `key`.<field>."""
        key = key or f"{REGISTRY}.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(key, "a feature name of letters, digits and _ (starting with a letter)", name)
        if not isinstance(cfg, dict):
            raise ConfigError(key, "a mapping with a `kind`", cfg)
        kind = cfg.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{key}.kind", f"one of {', '.join(KINDS)}", kind)
        for extra in sorted(set(cfg) - {"kind"} - _KEYS[kind]):
            where = "a key of no feature kind" if extra not in _ALL_KEYS else f"not read by a {kind} feature"
            raise ConfigError(f"{key}.{extra}", f"one of the keys of a {kind} feature "
                                                f"({', '.join(sorted(_KEYS[kind]))}); {extra!r} is {where}")
        values = {"name": name, "kind": kind, "key": key}
        if "scope" in cfg:
            if cfg["scope"] not in SCOPES:
                raise ConfigError(f"{key}.scope", "completion or text (prompt + completion)", cfg["scope"])
            values["scope"] = cfg["scope"]
        if cfg.get("threshold") is not None:
            values["threshold"] = _number(cfg["threshold"], f"{key}.threshold")
        values["ignore_case"] = cfg.get("ignore_case", kind == "words")
        if not isinstance(values["ignore_case"], bool):
            raise ConfigError(f"{key}.ignore_case", "true or false", values["ignore_case"])
        if "batch_size" in cfg:
            if not isinstance(cfg["batch_size"], int) or isinstance(cfg["batch_size"], bool) or cfg["batch_size"] < 1:
                raise ConfigError(f"{key}.batch_size", "a positive integer", cfg["batch_size"])
            values["batch_size"] = cfg["batch_size"]
        if kind == "regex":
            pattern = cfg.get("pattern")
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{key}.pattern", "a regular expression (Python re syntax)", pattern)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{key}.pattern", f"a valid regular expression ({exc})", pattern) from None
            values["pattern"] = pattern
        elif kind == "words":
            words = cfg.get("words")
            if (not isinstance(words, list) or not words
                    or not all(isinstance(w, str) and w.strip() for w in words)):
                raise ConfigError(f"{key}.words", "a non-empty list of words", words)
            values["words"] = tuple(w.strip() for w in words)
        elif kind == "classifier":
            model, label = cfg.get("model"), cfg.get("label")
            if not isinstance(model, str) or not model:
                raise ConfigError(f"{key}.model", "a Hugging Face text-classification model (folder or name)", model)
            if not isinstance(label, (str, int)) or isinstance(label, bool):
                raise ConfigError(f"{key}.label", "a label name of the classifier (or its index)", label)
            values.update(model=model, label=label)
        elif kind == "callable":
            values["function"] = cfg.get("function")
            from fdpipe.common.imports import SPEC, EXAMPLE

            if not isinstance(values["function"], str) or not SPEC.match(values["function"]):
                raise ConfigError(f"{key}.function", EXAMPLE, values["function"])
        return cls(**values)

    def check_available(self) -> None:
        """Import a callable's module and check a classifier folder exists (ConfigError otherwise).

        A classifier `model` is a local folder when it exists, starts with ``.``, ``/`` or
        ``~``, or its parent folder exists; anything else is taken for a Hub name, which
        only loading can check.
        """
        if self.kind == "callable":
            from fdpipe.common.imports import load_callable

            load_callable(self.function, f"{self.key}.function")
        elif self.kind == "classifier":
            path = Path(os.path.expanduser(self.model))
            looks_local = self.model.startswith((".", "/", "~")) or (
                len(path.parts) > 1 and path.parent.is_dir())
            if looks_local and not (path / "config.json").is_file():
                problem = "no config.json in it" if path.is_dir() else "it does not exist"
                raise ConfigError(f"{self.key}.model", f"a text-classification model folder ({problem}, "
                                                       f"relative to {os.getcwd()})", self.model)


@dataclass(frozen=True)
class FeatureUse:
    """A feature used by a target: a pointwise condition (`epsilon`) or a moment (`moment`)."""

    spec: FeatureSpec
    epsilon: float | None = None
    moment: float | None = None
    key: str = field(default="", compare=False)    # e.g. alignment.runs.gdc.target.features.film

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_condition(self) -> bool:
        return self.moment is None

    def to_config(self) -> dict:
        return {"moment": self.moment} if self.moment is not None else {"epsilon": self.epsilon}


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(key, "a number", value)
    return float(value)


def parse_definitions(definitions, key: str = REGISTRY) -> dict[str, FeatureSpec]:
    """Every entry of a features mapping (``alignment.features``), parsed."""
    if definitions is None:
        return {}
    if not isinstance(definitions, dict):
        raise ConfigError(key, "a mapping from feature name to its definition", definitions)
    return {name: FeatureSpec.from_config(name, cfg, f"{key}.{name}") for name, cfg in definitions.items()}


def parse_uses(kind: str, uses, specs: dict[str, FeatureSpec], key: str,
               default_epsilon: float = DEFAULT_EPSILON) -> tuple[FeatureUse, ...]:
    """The ``features`` of a target of `kind` whose config key is `key`, in config order.

    In a ``pointwise`` or ``rlhf`` target every entry is a condition (``epsilon``, default
    `default_epsilon`); in a ``distributional`` target an entry gives either ``moment`` or
    ``epsilon``, and at least one gives a moment.
    """
    if not isinstance(uses, dict) or not uses:
        raise ConfigError(f"{key}.features", f"a mapping from names of {REGISTRY} entries to their use", uses)
    out = []
    for name, use in uses.items():
        use_key = f"{key}.features.{name}"
        if name not in specs:
            known = ", ".join(specs) or "none defined"
            raise ConfigError(use_key, f"the name of an entry of {REGISTRY} ({known})")
        spec, use = specs[name], use or {}
        if not isinstance(use, dict):
            raise ConfigError(use_key, "a mapping with `moment` or `epsilon`", use)
        for extra in sorted(set(use) - {"moment", "epsilon"}):
            raise ConfigError(f"{use_key}.{extra}", "one of the keys epsilon, moment")
        moment, epsilon = use.get("moment"), use.get("epsilon")
        if moment is not None and epsilon is not None:
            raise ConfigError(use_key, "either a moment (distributional constraint) or an epsilon (pointwise "
                                       "condition), not both")
        if moment is not None:
            moment = _number(moment, f"{use_key}.moment")
            if kind != "distributional":
                raise ConfigError(f"{use_key}.moment", f"no moment in a {kind} target (moments are requested by "
                                                       "distributional targets; a condition takes epsilon)", moment)
            if spec.binary and not 0 < moment < 1:
                raise ConfigError(f"{use_key}.moment", f"a fraction strictly between 0 and 1 ({name} is binary)",
                                  moment)
            out.append(FeatureUse(spec, moment=moment, key=use_key))
            continue
        if kind == "distributional" and epsilon is None:
            raise ConfigError(use_key, "a moment (distributional constraint) or an epsilon (pointwise condition)")
        epsilon = default_epsilon if epsilon is None else _number(epsilon, f"{use_key}.epsilon")
        if not 0 <= epsilon < 1:
            raise ConfigError(f"{use_key}.epsilon", "a number in [0, 1) (0: a hard zero)", epsilon)
        if not spec.binary:
            raise ConfigError(use_key, f"a binary feature for a pointwise condition ({spec.key} is a real-valued "
                                       f"{spec.kind} feature: give it a threshold)")
        out.append(FeatureUse(spec, epsilon=epsilon, key=use_key))
    if kind == "distributional" and all(u.is_condition for u in out):
        raise ConfigError(f"{key}.features", "at least one feature with a moment in a distributional target")
    return tuple(out)


def check_features(alignment: dict | None) -> None:
    """Check ``alignment.features`` and every run's use of them (ConfigError naming the key).

    Callables are imported and classifier folders looked for (`FeatureSpec.check_available`);
    runs are those of `fdpipe.common.config.run_names`.
    """
    from fdpipe.common.config import merged_run_config, run_names

    alignment = alignment or {}
    specs = parse_definitions(alignment.get("features"))
    for spec in specs.values():
        spec.check_available()
    for run in run_names(alignment):
        target = merged_run_config(alignment, run).get("target") or {}
        if target.get("features") is not None:
            epsilon = target.get("epsilon", DEFAULT_EPSILON)
            parse_uses(target.get("kind"), target["features"], specs, f"alignment.runs.{run}.target",
                       default_epsilon=epsilon)
