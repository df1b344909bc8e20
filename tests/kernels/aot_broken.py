"""Kernels the compile check must reject (tests/kernels/test_aot.py, the test of the test).

Each breaks one rule that `TRITON_INTERPRET=1` does not enforce, or that only shows on a
device: a loop-carried variable whose type changes, branches that give a variable two
types, and a shared-memory request beyond the target's per-block maximum. `launches()`
returns one `Launch` per kernel: on `meta` tensors for the compile check (with
`TRITON_INTERPRET=0`, in a subprocess), on CPU tensors to show that the interpreter runs
them without complaint.
"""
import torch

from fdpipe_kernels.backend import tl, triton
from fdpipe_kernels.launch import Launch


@triton.jit
def _int_accumulator_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    acc = 0  # int32 before the loop, float32 after one step: a loop-carried type change
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.sum(tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0), axis=0)
    tl.store(out_ptr, acc)


@triton.jit
def _mismatched_branch_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    if n_cols > BLOCK:
        value = tl.sum(tl.load(x_ptr + cols), axis=0)  # float32
    else:
        value = n_cols  # int32
    tl.store(out_ptr, value)


@triton.jit
def _shared_hog_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # One [M, K] x [K, N] product: both operand tiles are staged in shared memory.
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


def launches(device="meta") -> dict[str, Launch]:
    """One launch per broken kernel, as a launcher would make it."""
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype, device=device)

    m, n, k = 128, 128, 512  # fp16 operand tiles: 2 x 128 KiB staged, over both targets' limits
    return {
        "int_accumulator": Launch(_int_accumulator_kernel, (1,), (zeros(4096), zeros(1), 4096),
                                  dict(BLOCK=1024), 4),
        "mismatched_branch": Launch(_mismatched_branch_kernel, (1,), (zeros(4096), zeros(1), 4096),
                                    dict(BLOCK=1024), 4),
        "shared_hog": Launch(_shared_hog_kernel, (1,),
                             (zeros(m, k, dtype=torch.float16), zeros(k, n, dtype=torch.float16), zeros(m, n)),
                             dict(M=m, N=n, K=k), 8),
    }
