"""A user's function named in the config as ``module:function``.

The module is imported from an installed package or, failing that, from the working
directory (where Snakemake runs every job), so a file ``my_features.py`` beside the config
is found as ``my_features:function``. Every failure is a `ConfigError` naming the key.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

from fdpipe.common.errors import ConfigError

SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
EXAMPLE = "module:function, e.g. my_features:mentions_actor"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if exc.name not in (top, module_name) or cwd in sys.path:
            raise
        sys.path.append(cwd)        # after the installed packages: a stray file never shadows one
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def load_callable(spec, key: str):
    """The object ``function`` of ``module`` for ``spec = "module:function"`` (dotted parts allowed).

    Raises `ConfigError` naming `key` when the spec is malformed, the module cannot be
    imported (the reason is in the message), the name is missing or is not callable.
    """
    if not isinstance(spec, str) or not SPEC.match(spec):
        raise ConfigError(key, EXAMPLE, spec)
    module_name, attr = spec.split(":")
    try:
        obj = _import(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise ConfigError(key, f"a module importable from the working directory or an installed package "
                               f"({_first_line(exc)})", spec) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"a function of module {module_name!r} (it has no {attr!r})", spec)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, f"a callable (texts -> floats); {spec} is a {type(obj).__name__}", spec)
    return obj
