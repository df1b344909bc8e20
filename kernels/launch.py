"""Helpers every op module uses to launch its Triton kernels.

Host side: `as_rows` flattens `[..., V]` inputs to `[N, V]` rows with unit column stride,
`row_flags` turns an optional row mask into one uint8 per row, `upstream` makes an incoming
gradient (possibly expanded, stride 0) a contiguous float32 vector, and `block_and_warps`
picks the vocabulary block a program streams per step and the warps that run it. Every
launcher builds a `Launch` (kernel, grid, arguments, constexprs, warps) and calls it;
`recorded_launches` collects those instead of running them, which is how `aot` finds the
exact specialisations the public functions produce (it calls them on `meta` tensors).

Device side (`triton.jit` helpers called from inside the kernels): `row_index` is the
program's row as int64, so that `row * row_stride` cannot overflow 32 bits on large
`[N, V]` tensors, and `zero_row` writes zeros over one row (the gradient of an ignored or
masked row).

Naming in the op modules: `_<op>_forward_kernel` / `_<op>_backward_kernel` are the Triton
kernels, `<op>_forward` / `<op>_backward` launch them on `[N, V]` rows into buffers the
caller allocates, `<Op>Function` is the `torch.autograd.Function` built on those launchers,
`<op>_triton` is the Triton path of the public `<op>`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .backend import tl, triton


# Input dtypes the kernels are built, tested and compile-checked (`aot`) for.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride (a view when the layout allows it)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def row_flags(mask: torch.Tensor | None, n_rows: int, device) -> torch.Tensor:
    """The mask as one uint8 per row (all ones when there is no mask)."""
    if mask is None:
        return torch.ones(n_rows, dtype=torch.uint8, device=device)
    return mask.reshape(-1).to(torch.uint8).contiguous()


def upstream(grad: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as a contiguous float32 vector (it may arrive expanded, stride 0)."""
    return grad.reshape(-1).to(torch.float32).contiguous()


def block_and_warps(n_cols: int, max_block: int) -> tuple[int, int]:
    """Vocabulary block per loop step (a power of two, at most `max_block`) and the warps for it."""
    block = min(max_block, triton.next_power_of_2(max(n_cols, 1)))
    return block, (4 if block <= 1024 else 8)


# While `recorded_launches` is active: the list that `Launch.__call__` appends to.
_recorded: list | None = None


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher decides it: `kernel[grid](*args, **constexprs, num_warps=...)`."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    def __call__(self) -> None:
        if _recorded is not None:
            _recorded.append(self)
            return
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


@contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Collect every `Launch` called inside the block instead of running it (not thread-safe).

    With `meta` tensors the public functions then run end to end (forward and backward)
    without a device, and the list holds exactly what they would launch.
    """
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


@triton.jit
def row_index():
    """This program's row (program id 0) as int64, for overflow-free row offsets."""
    return tl.program_id(0).to(tl.int64)


@triton.jit
def zero_row(out_ptr, n_cols, BLOCK: tl.constexpr):
    """Write zeros over `n_cols` values from `out_ptr`, `BLOCK` at a time."""
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + cols, 0.0, mask=cols < n_cols)
