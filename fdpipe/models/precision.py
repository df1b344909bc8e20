"""Numerical precision of the forward passes: ``fp32`` or ``bf16``.

Mixed precision here is ``torch.autocast`` with bfloat16, not bfloat16 weights:

* the weights, their gradients and the optimizer's moments stay float32 (they are the master
  copies), so checkpoints, resume states and saved models have the same format and meaning
  in both precisions, and small Adam updates are never rounded away;
* inside the autocast region the matrix products (linear layers, attention, the LM head) run
  in bfloat16, which is where the time and the activation memory go on a GPU; autocast keeps
  reductions, norms and softmax-like ops in float32;
* the same code runs on CPU (CPU autocast supports bfloat16), so the bf16 path is tested on
  every machine, and ``fp32`` is no autocast at all, bit for bit the float32 computation.

Log-probabilities never come out of the autocast region in bfloat16: the logits are upcast
to float32 before any log-softmax (`upcast`), the kernels of `fdpipe_kernels` accumulate in
float32, and everything of f-DPG downstream (log Z, pseudo-rewards, baselines, estimates) is
float32/float64 arithmetic outside autocast. Backward passes run outside the region, as
autocast expects.
"""
from __future__ import annotations

import contextlib

import torch

from fdpipe.common.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
DEFAULT = "fp32"


def check(value, key: str) -> str:
    """`value` if it names a precision (None: the default), else a `ConfigError` naming `key`."""
    if value is None:
        return DEFAULT
    if value not in PRECISIONS:
        raise ConfigError(key, f"one of {', '.join(PRECISIONS)}", value)
    return value


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """The region where forward passes run in `precision` on `device` (a device or its name).

    ``fp32``: a no-op context (plain float32). ``bf16``: ``torch.autocast`` with bfloat16 on
    the device's type (``cpu`` or ``cuda``).
    """
    if precision == "fp32" or precision is None:
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits as float32 before a log-softmax (a no-op on float32 and float64 tensors)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
