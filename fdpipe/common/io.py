"""Reading and writing outputs: Parquet with provenance metadata, written atomically.

Every table fdpipe writes carries key/value metadata (config hash, code version, package
versions, seed, timestamp) under the Parquet schema metadata key ``fdpipe``. Writes go to a
temporary file in the same folder and are renamed into place, so a failed stage never
leaves a partial output behind.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import metadata as _metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fdpipe.common.errors import DataError

METADATA_KEY = b"fdpipe"
_PACKAGES = ("fdpipe", "torch", "transformers", "triton", "numpy", "pandas", "pyarrow", "snakemake")


def config_hash(config) -> str:
    """Stable short hash of a JSON-serialisable config section."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_version() -> str:
    """`git describe` of the source tree when available, else the package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from fdpipe import __version__
    return __version__


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            continue
    return versions


def provenance(config=None, seed=None, **extra) -> dict:
    """Metadata stored with every output: what produced it, from which config, when."""
    return {
        "config_hash": config_hash(config) if config is not None else None,
        "config": config,
        "code_version": code_version(),
        "packages": package_versions(),
        "seed": seed,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; move it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary sibling folder; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp creates 0700
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_file(path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(df: pd.DataFrame, path, meta: dict | None = None) -> None:
    """Write `df` to `path` atomically, with `meta` as JSON under the `fdpipe` metadata key."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    existing = table.schema.metadata or {}
    blob = json.dumps(meta or {}, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata({**existing, METADATA_KEY: blob})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path, required=(), *, min_rows: int = 0) -> pd.DataFrame:
    """Read a Parquet file, with a one-line error naming the path when it is missing, corrupt,
    lacks one of the `required` columns or has fewer than `min_rows` rows.

    `required` is a sequence of column names, or a mapping name -> kind where kind ``"text"``
    or ``"number"`` also checks that the column has no missing values and holds strings or
    (non-boolean) numbers; kind None checks presence only.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(path, f"not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    kinds = dict(required) if isinstance(required, dict) else dict.fromkeys(required)
    missing = [c for c in kinds if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}")
    if len(df) < min_rows:
        raise DataError(path, f"expected at least {min_rows} row(s), found {len(df)}")
    for column, kind in kinds.items():
        if kind is not None:
            _check_column(df[column], column, kind, path)
    return df


def _check_column(values: pd.Series, column: str, kind: str, path) -> None:
    if values.isna().any():
        raise DataError(path, f"column '{column}' has {int(values.isna().sum())} missing value(s)")
    if kind == "text" and not values.map(lambda v: isinstance(v, str)).all():
        raise DataError(path, f"column '{column}': expected text, got dtype {values.dtype}")
    if kind == "number" and (not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
        raise DataError(path, f"column '{column}': expected numbers, got dtype {values.dtype}")
    if kind not in ("text", "number"):
        raise ValueError(f"column kind: expected 'text', 'number' or None, got {kind!r}")


def read_metadata(path) -> dict:
    """The provenance metadata stored by `write_parquet`."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(METADATA_KEY, b"{}"))
