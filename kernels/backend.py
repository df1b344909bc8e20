"""Which implementation runs: the Triton kernels or the torch reference.

`auto` (the default) runs Triton on CUDA tensors and the torch reference otherwise. `triton`
forces the kernels (CUDA tensors, or CPU tensors when Triton's interpreter was enabled with
`TRITON_INTERPRET=1` before `fdpipe_kernels` was imported); `torch` forces the reference. The
environment variable `FDPIPE_KERNEL_BACKEND` sets the starting choice, `set_backend` changes
it for the running process.

Triton is an optional dependency: without it `HAS_TRITON` is False, `auto` always uses the
reference and forcing `triton` raises `BackendError`.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the reference path keeps working without triton
    HAS_TRITON = False

    class _MissingTriton:
        """Stands in for `triton` / `triton.language` so kernel modules still import."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _MissingTriton()

# Read once: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FDPIPE_KERNEL_BACKEND"


class BackendError(RuntimeError):
    """The requested backend cannot run here; the message says why in one line."""


def _validate(name, source: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise BackendError(f"{source}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return value


_backend = _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def set_backend(name: str) -> str:
    """Choose `auto`, `triton` or `torch` for every later call; returns the previous choice."""
    global _backend
    previous, _backend = _backend, _validate(name, "fdpipe_kernels.set_backend")
    return previous


def get_backend() -> str:
    """The current choice: `auto`, `triton` or `torch`."""
    return _backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run on these tensors (all on one device)."""
    if _backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if _backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise BackendError("kernel backend 'triton' requested but triton is not importable; install triton or use 'torch'")
    if not on_cuda and not INTERPRETED:
        devices = sorted({str(t.device) for t in tensors})
        raise BackendError(
            f"kernel backend 'triton' needs CUDA tensors (got {', '.join(devices)}); "
            "for CPU set TRITON_INTERPRET=1 before importing fdpipe_kernels, or use backend 'torch'"
        )
    return True
