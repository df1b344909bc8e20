"""The measurement loop: every case of the grid, every implementation, every mode."""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import platform
from dataclasses import asdict

import pandas as pd
import torch

from fdpipe_kernels import backend as kernel_backend

from .results import add_speedups, installed_version
from .settings import DTYPES, BenchSettings, cases, validate
from .timing import copy_bandwidth, measure
from .workloads import grad_key, implementations, make_inputs, min_bytes, useful_flops

log = logging.getLogger("fdpipe.bench")


def _free(cuda):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run(settings: BenchSettings, device: str | torch.device | None = None) -> tuple[pd.DataFrame, dict]:
    """Measure the grid; returns the tidy results and run facts (device, copy bandwidths)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and kernel_backend.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it (before importing fdpipe_kernels) "
                           "to benchmark on CUDA")
    validate(settings)
    impls = implementations(settings, cuda)
    rows, bandwidths = [], {}
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        _run_cases(settings, device, cuda, impls, rows, bandwidths)
    finally:
        torch.set_num_threads(threads_before)
    df = add_speedups(pd.DataFrame(rows))
    facts = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                   f"torch threads: {settings.threads or threads_before})",
        "copy_gbps": {f"{numel}x{dt}": bw / 1e9 for (numel, dt), bw in bandwidths.items()},
        "torch": torch.__version__,
        "triton": installed_version("triton"),
        "liger_kernel": installed_version("liger_kernel"),
        "cuda": torch.version.cuda,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
    }
    return df, facts


def _run_cases(settings, device, cuda, impls, rows, bandwidths):
    """The measurement loop of `run`: appends one row per (case, impl, mode)."""
    for op, dtype_name, n, v in cases(settings):
        dtype = DTYPES[dtype_name]
        h = settings.hidden if op == "linear_token_logprobs" else 0
        key = (n * v, dtype_name)
        if key not in bandwidths:  # measured before the inputs exist, so that it fits
            try:
                bandwidths[key] = copy_bandwidth(torch.empty((n, v), dtype=dtype, device=device), cuda)
            except torch.cuda.OutOfMemoryError:
                bandwidths[key] = float("nan")
            _free(cuda)
        copy_bw = bandwidths[key]
        try:
            inputs = make_inputs(op, n, v, settings.hidden, dtype, device, settings.seed)
        except torch.cuda.OutOfMemoryError:
            log.warning("%s N=%d V=%d %s: inputs do not fit in memory", op, n, v, dtype_name)
            _free(cuda)
            continue
        for impl, fn in impls[op].items():
            if impl == "compile" and not ([n, v] == list(settings.compile_shape) and dtype_name in settings.compile_dtypes):
                continue
            for mode in settings.modes:
                row = {"op": op, "impl": impl, "n_tokens": n, "vocab": v, "hidden": h, "dtype": dtype_name,
                       "mode": mode, "device": device.type,
                       "backend": ("triton" if kernel_backend.use_triton(*inputs.values()) else "torch")
                       if impl == "fdpipe" else impl}
                try:
                    median, times, peak = measure(fn, inputs, grad_key(op), mode, settings, cuda)
                except torch.cuda.OutOfMemoryError:
                    row.update(status="oom")
                    _free(cuda)
                except Exception as exc:  # a baseline that fails here is recorded, not fatal
                    row.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                    _free(cuda)
                else:
                    moved = min_bytes(op, mode, n, v, h, dtype.itemsize)
                    flops = useful_flops(op, mode, n, v, h)
                    row.update(status="ok", median_ms=median * 1e3, min_ms=min(times) * 1e3,
                               max_ms=max(times) * 1e3, repeats=len(times),
                               effective_gbps=moved / median / 1e9, copy_gbps=copy_bw / 1e9,
                               bandwidth_fraction=moved / median / copy_bw, tflops=flops / median / 1e12,
                               peak_extra_mb=peak / 2**20)
                rows.append(row)
                log.info("%-22s %-7s %-6s N=%-6d V=%-6d %-16s %s", op, impl, dtype_name, n, v, mode,
                         f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else row["status"])
        del inputs
        _free(cuda)
