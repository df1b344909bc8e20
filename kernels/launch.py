"""Helpers every op module uses to launch its Triton kernels.

Host side: `as_rows` flattens `[..., V]` inputs to `[N, V]` rows with unit column stride,
`row_flags` turns an optional row mask into one uint8 per row, `upstream` makes an incoming
gradient (possibly expanded, stride 0) a contiguous float32 vector, and `block_and_warps`
picks the vocabulary block a program streams per step and the warps that run it.

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

import torch

from .backend import tl, triton


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
