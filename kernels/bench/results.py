"""Results: speedups over the baselines, the Markdown page, and the Parquet file with its
provenance (written here, so that the kernels package depends on nothing else of the project)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .settings import BASELINES, MODES, OPS

METADATA_KEY = b"fdpipe"  # the schema metadata key the pipeline's Parquet readers look under
PACKAGES = ("torch", "triton", "liger-kernel", "pandas", "pyarrow")


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """On fdpipe rows: baseline median time / fdpipe median time, per baseline (NaN if absent)."""
    if df.empty:
        return df
    keys = ["op", "n_tokens", "vocab", "dtype", "mode"]
    ok = df[df["status"] == "ok"] if "median_ms" in df else df.iloc[0:0]
    for baseline in BASELINES:
        base = ok[ok["impl"] == baseline][keys + ["median_ms"]].rename(columns={"median_ms": "_base"})
        merged = df.merge(base, on=keys, how="left")
        speed = merged["_base"] / merged.get("median_ms", float("nan"))
        df[f"speedup_vs_{baseline}"] = speed.where(merged["impl"] == "fdpipe").to_numpy()
    return df


# ---------------------------------------------------------------------------------------
# Markdown


def markdown(df: pd.DataFrame, facts: dict) -> str:
    """A Markdown page: run facts, then per op a table of fdpipe times and speedups per mode."""
    lines = ["# Kernel benchmarks", "",
             "Written by `python -m fdpipe_kernels.bench` (see kernels/README.md); the Parquet file beside the",
             "run output holds every row, including the baselines' own times.", "",
             f"- device: {facts['device']}",
             f"- torch {facts['torch']}, triton {facts['triton']}, liger-kernel {facts['liger_kernel']}, "
             f"CUDA {facts['cuda']}",
             f"- date (UTC): {facts['date_utc']}",
             f"- copy bandwidth measured in the same run (GB/s): "
             f"{', '.join(f'{v:.3g}' for v in sorted(set(facts['copy_gbps'].values())))}", ""]
    if not facts["device"].startswith("CPU"):
        lines += ["Times are medians in ms; `x eager` etc. are baseline time / fdpipe time (higher is "
                  "better for fdpipe); `bw` is the minimum bytes the op must move per second as a "
                  "fraction of copy bandwidth (LM head: TFLOP/s instead); `mem` is peak extra memory "
                  "in MiB.", ""]
    else:
        lines += ["**CPU smoke configuration.** No CUDA device: `fdpipe` here is the torch reference "
                  "path and the only baseline is eager torch, on tiny shapes. These numbers only show "
                  "that the harness runs; they say nothing about the Triton kernels. **GPU table pending:** "
                  "run `bash kernels/gpu_check.sh` on a CUDA machine to replace this page.", ""]
    if df.empty or "median_ms" not in df:
        return "\n".join(lines + ["(no successful measurements)", ""])
    ours = df[df["impl"] == "fdpipe"]
    for op in OPS:
        part = ours[ours["op"] == op]
        if part.empty:
            continue
        lines += [f"## {op}", ""]
        header = ["dtype", "N", "V", "mode", "fdpipe ms", "x eager", "x compile", "x liger",
                  "TFLOP/s" if op == "linear_token_logprobs" else "bw", "mem"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        part = part.assign(_mode=pd.Categorical(part["mode"], categories=list(MODES), ordered=True))
        for _, r in part.sort_values(["dtype", "n_tokens", "vocab", "_mode"]).iterrows():
            if r["status"] != "ok":
                cells = [r["dtype"], r["n_tokens"], r["vocab"], r["mode"], r["status"], "", "", "", "", ""]
            else:
                cells = [r["dtype"], r["n_tokens"], r["vocab"], r["mode"], f"{r['median_ms']:.3f}",
                         _fmt(r.get("speedup_vs_eager")), _fmt(r.get("speedup_vs_compile")),
                         _fmt(r.get("speedup_vs_liger")),
                         _fmt(r["tflops"] if op == "linear_token_logprobs" else r["bandwidth_fraction"]),
                         _fmt(r["peak_extra_mb"], "{:.0f}")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        lines += ["## Cases that did not run", ""]
        for _, r in bad.iterrows():
            lines.append(f"- {r['op']} {r['impl']} {r['dtype']} N={r['n_tokens']} V={r['vocab']} {r['mode']}: {r['status']}")
        lines.append("")
    return "\n".join(lines)


def _fmt(value, pattern="{:.2f}"):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


# ---------------------------------------------------------------------------------------
# Parquet with provenance


def installed_version(name: str) -> str | None:
    """Version of an installed distribution (`liger_kernel` and `liger-kernel` alike), or None."""
    try:
        return metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def code_version() -> str | None:
    """`git describe` of the source tree when it is a git checkout, else the installed version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return installed_version("fdpipe")


def provenance(config, facts: dict) -> dict:
    """The metadata stored with the results: what produced them, with which settings, where, when."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return {
        "config_hash": hashlib.sha256(blob).hexdigest()[:16],
        "config": config,
        "settings": facts["settings"],
        "code_version": code_version(),
        "packages": {name: v for name in PACKAGES if (v := installed_version(name)) is not None},
        "seed": facts["settings"]["seed"],
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": facts["device"],
        "copy_gbps": facts["copy_gbps"],
        "liger_kernel": facts["liger_kernel"],
        "cuda": facts["cuda"],
    }


def write_parquet(df: pd.DataFrame, path, meta: dict) -> None:
    """`df` to `path` with `meta` as JSON under the `fdpipe` schema metadata key; the file
    appears only once complete (written beside it, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    blob = json.dumps(meta, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: blob})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(df, facts, parquet_path, markdown_path=None, config=None):
    """Parquet with provenance (`config` defaults to the run's settings) and, when asked, the
    Markdown table."""
    write_parquet(df, parquet_path, provenance(config if config is not None else facts["settings"], facts))
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown(df, facts))
