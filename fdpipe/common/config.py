"""Config helpers that the workflow uses at DAG-build time (no heavy imports here)."""
from __future__ import annotations

import copy

from fdpipe.common.errors import ConfigError


def run_names(alignment_cfg: dict) -> list[str]:
    """The alignment runs that exist: ``alignment.select`` when given, else every entry of
    ``alignment.runs``.

    Config files given with ``--configfile`` merge into config/config.yaml entry by entry, so
    they can add runs but not remove the default ones; ``select`` states exactly which runs
    a config wants.
    """
    runs = alignment_cfg.get("runs") or {}
    select = alignment_cfg.get("select")
    if select is None:
        return list(runs)
    if not isinstance(select, list) or not select or not all(isinstance(name, str) for name in select):
        raise ConfigError("alignment.select", "a non-empty list of run names (or null for every run)", select)
    unknown = [name for name in select if name not in runs]
    if unknown:
        raise ConfigError("alignment.select", f"names of alignment.runs entries ({', '.join(runs) or 'none'})",
                          unknown[0])
    if len(set(select)) != len(select):
        raise ConfigError("alignment.select", "each run named once", select)
    return list(select)


def merged_run_config(alignment_cfg: dict, run: str) -> dict:
    """``alignment.defaults`` overridden by ``alignment.runs.<run>`` (nested dicts merged).

    This merged mapping is exactly what one align job reads, so it is also that job's
    Snakemake ``params``: changing a default reruns every run, changing one run reruns it alone.
    A target written over features (``target.features``) brings the definitions of those
    features from ``alignment.features`` under the key ``features``, so that changing a
    feature reruns exactly the runs that use it.
    """
    runs = alignment_cfg.get("runs") or {}
    if run not in runs:
        raise ConfigError("alignment.runs", f"a run named {run!r} (known: {', '.join(runs) or 'none'})")
    merged = copy.deepcopy(alignment_cfg.get("defaults") or {})
    for key, value in (runs[run] or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    uses = (merged.get("target") or {}).get("features")
    if isinstance(uses, dict) and uses:
        # the definitions (alignment.features) of the features the run's target uses
        registry = alignment_cfg.get("features") or {}
        merged["features"] = {name: copy.deepcopy(registry[name]) for name in uses if name in registry}
    return merged


def known_keys(cfg: dict | None, fields, key: str) -> dict:
    """A copy of the config section `cfg`; a key not in `fields` raises ConfigError naming it."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"one of the known keys ({', '.join(sorted(fields))})")
    return cfg


def _with_defaults(validator_class):
    """A jsonschema validator class that fills in `default` values while it validates."""
    from jsonschema import validators

    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(validator_class, {"properties": properties})


def validate_config(config: dict, schema_path) -> dict:
    """Validate `config` against the JSON schema at `schema_path`, filling in defaults.

    The first problem raises `ConfigError` with one line naming the key, e.g.
    ``config key 'alignment.runs.rkl.lr': expected a value > 0, got -1``. After the schema,
    the features of ``alignment.features`` and their uses in targets are checked
    (`fdpipe.common.feature_specs.check_features`: regexes compile, callables import,
    classifier folders exist, moments are in range).
    """
    import yaml
    from jsonschema import validators

    with open(schema_path) as fh:
        schema = yaml.safe_load(fh)
    cls = _with_defaults(validators.validator_for(schema))
    errors = sorted(cls(schema).iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = set(err.schema.get("properties", {}))
            unknown = sorted(set(err.instance) - known)
            prefix = f"{key}." if err.absolute_path else ""
            raise ConfigError(f"{prefix}{unknown[0]}" if unknown else key,
                              f"one of the known keys ({', '.join(sorted(known))})")
        raise ConfigError(key, _expected(err), err.instance)
    if isinstance(config.get("alignment"), dict):
        from fdpipe.common.feature_specs import check_features

        run_names(config["alignment"])
        check_features(config["alignment"])
    return config


def _expected(err) -> str:
    """Turn a jsonschema error into the 'expected ...' part of a ConfigError."""
    v, value = err.validator, err.validator_value
    return {
        "type": f"a value of type {value}",
        "enum": f"one of {value}",
        "minimum": f"a value >= {value}",
        "maximum": f"a value <= {value}",
        "exclusiveMinimum": f"a value > {value}",
        "exclusiveMaximum": f"a value < {value}",
        "pattern": f"a string matching {value}",
        "minProperties": f"at least {value} entries",
        "minItems": f"a list of at least {value} item(s)",
        "uniqueItems": "a list without repeated items",
        "required": "the required keys",
    }.get(v, err.message)
