"""Per-token log-probabilities (and entropy) of softmax(logits / T): Triton kernels.

One program handles one row (token). The forward streams the vocabulary in blocks with an
online softmax (running max `m`, running sum `s` of exp(x - m), and for the entropy the
running sum `e` of exp(x - m) * (x - m)), then stores log p(target), the entropy and the
log-sum-exp, the latter kept split as (m, log s) so that log p_i = (x_i - m) - log s stays
exact for large logits (x - lse would lose the low bits of both). The backward reads the
logits once more and writes a fresh gradient buffer:

    d logp / d x_i    = (1[i = target] - p_i) / T
    d entropy / d x_i = -p_i (log p_i + H) / T

`token_logprobs_forward` / `token_logprobs_backward` launch the two kernels on [N, V] rows;
`linear_token_logprobs` reuses them on each chunk of LM-head logits.
"""
from __future__ import annotations

import torch

from . import reference
from .backend import tl, triton, use_triton
from .launch import Launch, as_rows, block_and_warps, row_index, upstream, zero_row

# Vocabulary block handled per loop step; rows longer than this are streamed.
MAX_BLOCK = 4096


@triton.jit
def _token_logprobs_forward_kernel(
    logits_ptr, logits_row_stride, targets_ptr, logp_ptr, max_ptr, log_sum_ptr, entropy_ptr,
    n_cols, ignore_index, temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = row_index()
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(log_sum_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * logits_row_stride
    m = float("-inf")  # running max (-inf until a finite logit is seen)
    s = 0.0  # sum of exp(x - m)
    e = 0.0  # sum of exp(x - m) * (x - m), for the entropy
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite reference point
        scale = tl.exp(m - m_ref)
        ex = tl.exp(x - m_ref)
        if WITH_ENTROPY:
            # re-centre the old sum on m_ref: exp(x - m) (x - m) summed, times exp(m - m_ref),
            # plus (m - m_ref) times the old s; guarded while s is still 0 and m still -inf
            shift = tl.where(s > 0, (m - m_ref) * s, 0.0)
            e = scale * (e + shift) + tl.sum(tl.where(ex > 0, ex * (x - m_ref), 0.0), axis=0)
        s = s * scale + tl.sum(ex, axis=0)
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    x_target = tl.load(row_ptr + target).to(tl.float32) / temperature
    tl.store(logp_ptr + row, (x_target - m_ref) - log_s)
    tl.store(max_ptr + row, m_ref)
    tl.store(log_sum_ptr + row, log_s)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_s - e / s)


@triton.jit
def _token_logprobs_backward_kernel(
    logits_ptr, logits_row_stride, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_ptr, grad_row_stride, n_cols, ignore_index, temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = row_index()
    target = tl.load(targets_ptr + row)
    out_ptr = grad_ptr + row * grad_row_stride
    if target == ignore_index:
        zero_row(out_ptr, n_cols, BLOCK)
        return
    row_ptr = logits_ptr + row * logits_row_stride
    m = tl.load(max_ptr + row)
    log_s = tl.load(log_sum_ptr + row)
    g = tl.load(grad_logp_ptr + row)
    if WITH_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row)
        ent = tl.load(entropy_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) / temperature
        logp = (x - m) - log_s
        p = tl.exp(logp)
        grad = tl.where(cols == target, g, 0.0) - g * p
        if WITH_ENTROPY:
            grad += tl.where(p > 0, -g_ent * p * (logp + ent), 0.0)
        grad = grad / temperature
        tl.store(out_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


def token_logprobs_forward(logits, targets, temperature, ignore_index, with_entropy, logp, lse, entropy):
    """Launch the forward on logits [N, V] (unit column stride) into the float32 buffers.

    `lse` is [2, N]: row maximum and log of the shifted sum (log-sum-exp = their sum).
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, warps = block_and_warps(n_cols, MAX_BLOCK)
    Launch(
        _token_logprobs_forward_kernel, (n_rows,),
        (logits, logits.stride(0), targets, logp, lse[0], lse[1], entropy if with_entropy else logp,
         n_cols, ignore_index, temperature),
        dict(WITH_ENTROPY=with_entropy, BLOCK=block), warps,
    )()


def token_logprobs_backward(logits, targets, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index,
                            with_entropy, grad_logits):
    """Launch the backward: write d(sum g*logp + g_ent*entropy)/d logits into `grad_logits` [N, V]."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block, warps = block_and_warps(n_cols, MAX_BLOCK)
    Launch(
        _token_logprobs_backward_kernel, (n_rows,),
        (logits, logits.stride(0), targets, lse[0], lse[1], entropy if with_entropy else grad_logp,
         grad_logp, grad_entropy if with_entropy else grad_logp,
         grad_logits, grad_logits.stride(0), n_cols, ignore_index, temperature),
        dict(WITH_ENTROPY=with_entropy, BLOCK=block), warps,
    )()


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V], targets [N] -> (logp [N], entropy [N] or [0]); saves logits and the lse."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, with_entropy):
        n_rows = logits.shape[0]
        logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty((2, n_rows), dtype=torch.float32, device=logits.device)
        entropy = torch.empty(n_rows if with_entropy else 0, dtype=torch.float32, device=logits.device)
        token_logprobs_forward(logits, targets, temperature, ignore_index, with_entropy, logp, lse, entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.args = (temperature, ignore_index, with_entropy)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy = ctx.args
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        token_logprobs_backward(
            logits, targets, lse, entropy, upstream(grad_logp),
            upstream(grad_entropy) if with_entropy else None,
            temperature, ignore_index, with_entropy, grad_logits,
        )
        return grad_logits, None, None, None, None


def token_logprobs_triton(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False):
    """The Triton path of `token_logprobs` (same contract)."""
    reference.check_token_shapes(logits, targets)
    temperature = reference.check_temperature(temperature)
    lead = targets.shape
    t = targets.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = TokenLogprobsFunction.apply(as_rows(logits), t, temperature, int(ignore_index), with_entropy)
    return (logp.reshape(lead), entropy.reshape(lead)) if with_entropy else logp.reshape(lead)


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False):
    """log softmax(logits / T)[target] per token, 0 where `targets == ignore_index`.

    logits [..., V] (any float dtype), targets [...] int. Returns float32 logp [...], or
    (logp, entropy) when `with_entropy`. Gradient flows to `logits`. A target whose logit is
    `-inf` gets `-inf`; `-inf` logits contribute nothing to the entropy.
    """
    if use_triton(logits):
        return token_logprobs_triton(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                     with_entropy=with_entropy)
    return reference.token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                    with_entropy=with_entropy)


def sequence_logprobs(logits, targets, mask, *, temperature=1.0):
    """Sum of log p(target) over the last dimension where `mask` is True.

    logits [..., T, V], targets [..., T] (aligned with logits; the caller shifts), mask
    [..., T] bool. Returns float32 [...].
    """
    reference.check_sequence_args(logits, targets, mask)
    masked = torch.where(mask, targets.to(torch.int64), torch.full_like(targets, -1, dtype=torch.int64))
    return token_logprobs(logits, masked, temperature=temperature, ignore_index=-1).sum(dim=-1)
