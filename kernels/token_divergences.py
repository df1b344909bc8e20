"""Per-token divergences between two models' token distributions: Triton kernels.

With a = logits / T, b = ref_logits / T, pi = softmax(a), ref = softmax(b), one program per
row computes

- pass 1, one read of both rows: the running maxima and sums of both softmaxes and the two
  KL divergences through an online recurrence. With reference points c_a, c_b (the running
  maxima) the kernel keeps S_a = sum exp(a - c_a), S_b likewise, and
  D_ab = sum exp(a - c_a) ((a - c_a) - (b - c_b)), D_ba symmetrically; when a maximum moves
  the sums are rescaled and re-centred. At the end
  KL(pi||ref) = D_ab / S_a - log S_a + log S_b and KL(ref||pi) = D_ba / S_b - log S_b + log S_a.
- pass 2, once both log-sum-exps are known (kept split as max and log-sum, so that
  log pi_i = (a_i - c_a) - log S_a stays exact for large logits): Jensen-Shannon with m = (pi + ref) / 2,
  JS = (KL(pi||m) + KL(ref||m)) / 2, and TV = sum |pi - ref| / 2; it also stores
  KL(pi||m) and sum pi sign(pi - ref), which the backward needs.

The backward (gradient to `logits` only; `ref_logits` is a constant) reads both rows once:

    dKL(pi||ref)/da_i = pi_i (log pi_i - log ref_i - KL(pi||ref))
    dKL(ref||pi)/da_i = pi_i - ref_i
    dJS/da_i          = pi_i (log(pi_i/m_i) - KL(pi||m)) / 2
    dTV/da_i          = pi_i (sign(pi_i - ref_i) - sum_j pi_j sign(pi_j - ref_j)) / 2

each times its upstream gradient, all divided by T. Terms with pi_i = 0 are exact zeros.

`token_divergences_forward` / `token_divergences_backward` launch the two kernels on [N, V] rows.
"""
from __future__ import annotations

import math

import torch

from . import reference
from .backend import tl, triton, use_triton
from .launch import Launch, as_rows, block_and_warps, row_flags, row_index, upstream, zero_row
from .reference import TokenDivergences

MAX_BLOCK = 2048  # two rows are streamed at once, so half the token_logprobs block
LOG2 = math.log(2.0)


@triton.jit
def _online_update(c, s, x_max):
    """New finite reference point and the factor that rescales the old sum onto it."""
    c_new = tl.maximum(c, x_max)
    c_new = tl.where(c_new == float("-inf"), 0.0, c_new)
    scale = tl.where(s > 0, tl.exp(c - c_new), 0.0)
    return c_new, scale


@triton.jit
def _log_probs_and_mid(x_row, y_row, cols, inside, temperature, c_x, log_s_x, c_y, log_s_y):
    """Normalised log-probabilities of both rows on a block, and log of their midpoint (p + q)/2."""
    x = tl.load(x_row + cols, mask=inside, other=float("-inf")).to(tl.float32) / temperature
    y = tl.load(y_row + cols, mask=inside, other=float("-inf")).to(tl.float32) / temperature
    lp = (x - c_x) - log_s_x
    lq = (y - c_y) - log_s_y
    hi = tl.maximum(lp, lq)
    hi = tl.where(hi == float("-inf"), 0.0, hi)
    lm = hi + tl.log(tl.exp(lp - hi) + tl.exp(lq - hi)) - 0.6931471805599453
    return lp, lq, lm


@triton.jit
def _token_divergences_forward_kernel(
    x_ptr, x_row_stride, y_ptr, y_row_stride, mask_ptr,
    kl_xy_ptr, kl_yx_ptr, js_ptr, tv_ptr, max_x_ptr, log_sum_x_ptr, max_y_ptr, log_sum_y_ptr,
    kl_xm_ptr, sign_ptr, n_cols, temperature,
    BLOCK: tl.constexpr,
):
    row = row_index()
    if tl.load(mask_ptr + row) == 0:
        tl.store(kl_xy_ptr + row, 0.0)
        tl.store(kl_yx_ptr + row, 0.0)
        tl.store(js_ptr + row, 0.0)
        tl.store(tv_ptr + row, 0.0)
        tl.store(max_x_ptr + row, 0.0)
        tl.store(log_sum_x_ptr + row, 0.0)
        tl.store(max_y_ptr + row, 0.0)
        tl.store(log_sum_y_ptr + row, 0.0)
        tl.store(kl_xm_ptr + row, 0.0)
        tl.store(sign_ptr + row, 0.0)
        return
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    # Pass 1: both softmax normalisers and both KLs, online.
    c_x = float("-inf")
    c_y = float("-inf")
    s_x = 0.0
    s_y = 0.0
    d_xy = 0.0
    d_yx = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(x_row + cols, mask=inside, other=float("-inf")).to(tl.float32) / temperature
        y = tl.load(y_row + cols, mask=inside, other=float("-inf")).to(tl.float32) / temperature
        c_x_new, scale_x = _online_update(c_x, s_x, tl.max(x, axis=0))
        c_y_new, scale_y = _online_update(c_y, s_y, tl.max(y, axis=0))
        # re-centre the old D sums on the new reference points before adding the block
        move = tl.where(s_x > 0, c_x - c_x_new, 0.0) - tl.where(s_y > 0, c_y - c_y_new, 0.0)
        d_xy = tl.where(s_x > 0, scale_x * (d_xy + s_x * move), 0.0)
        d_yx = tl.where(s_y > 0, scale_y * (d_yx - s_y * move), 0.0)
        sx = x - c_x_new
        sy = y - c_y_new
        ex = tl.exp(sx)
        ey = tl.exp(sy)
        d_xy += tl.sum(tl.where(ex > 0, ex * (sx - sy), 0.0), axis=0)
        d_yx += tl.sum(tl.where(ey > 0, ey * (sy - sx), 0.0), axis=0)
        s_x = s_x * scale_x + tl.sum(ex, axis=0)
        s_y = s_y * scale_y + tl.sum(ey, axis=0)
        c_x = c_x_new
        c_y = c_y_new
    log_s_x = tl.log(s_x)
    log_s_y = tl.log(s_y)
    tl.store(kl_xy_ptr + row, d_xy / s_x - log_s_x + log_s_y)
    tl.store(kl_yx_ptr + row, d_yx / s_y - log_s_y + log_s_x)
    tl.store(max_x_ptr + row, c_x)
    tl.store(log_sum_x_ptr + row, log_s_x)
    tl.store(max_y_ptr + row, c_y)
    tl.store(log_sum_y_ptr + row, log_s_y)
    # Pass 2: JS and TV need both normalised distributions.
    kl_xm = 0.0
    kl_ym = 0.0
    tv = 0.0
    sign_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        lp, lq, lm = _log_probs_and_mid(x_row, y_row, cols, inside, temperature, c_x, log_s_x, c_y, log_s_y)
        p = tl.exp(lp)
        q = tl.exp(lq)
        kl_xm += tl.sum(tl.where(p > 0, p * (lp - lm), 0.0), axis=0)
        kl_ym += tl.sum(tl.where(q > 0, q * (lq - lm), 0.0), axis=0)
        tv += tl.sum(tl.abs(p - q), axis=0)
        sign_sum += tl.sum(tl.where(p > q, p, tl.where(p < q, -p, 0.0)), axis=0)
    tl.store(js_ptr + row, 0.5 * (kl_xm + kl_ym))
    tl.store(tv_ptr + row, 0.5 * tv)
    tl.store(kl_xm_ptr + row, kl_xm)
    tl.store(sign_ptr + row, sign_sum)


@triton.jit
def _token_divergences_backward_kernel(
    x_ptr, x_row_stride, y_ptr, y_row_stride, mask_ptr,
    max_x_ptr, log_sum_x_ptr, max_y_ptr, log_sum_y_ptr, kl_xy_ptr, kl_xm_ptr, sign_ptr,
    g_kl_xy_ptr, g_kl_yx_ptr, g_js_ptr, g_tv_ptr,
    grad_ptr, grad_row_stride, n_cols, temperature,
    BLOCK: tl.constexpr,
):
    row = row_index()
    out_ptr = grad_ptr + row * grad_row_stride
    if tl.load(mask_ptr + row) == 0:
        zero_row(out_ptr, n_cols, BLOCK)
        return
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    c_x = tl.load(max_x_ptr + row)
    log_s_x = tl.load(log_sum_x_ptr + row)
    c_y = tl.load(max_y_ptr + row)
    log_s_y = tl.load(log_sum_y_ptr + row)
    kl_xy = tl.load(kl_xy_ptr + row)
    kl_xm = tl.load(kl_xm_ptr + row)
    sign_sum = tl.load(sign_ptr + row)
    g_kl_xy = tl.load(g_kl_xy_ptr + row)
    g_kl_yx = tl.load(g_kl_yx_ptr + row)
    g_js = tl.load(g_js_ptr + row)
    g_tv = tl.load(g_tv_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        lp, lq, lm = _log_probs_and_mid(x_row, y_row, cols, inside, temperature, c_x, log_s_x, c_y, log_s_y)
        p = tl.exp(lp)
        q = tl.exp(lq)
        sign = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        weighted = g_kl_xy * (lp - lq - kl_xy) + 0.5 * g_js * (lp - lm - kl_xm) + 0.5 * g_tv * (sign - sign_sum)
        grad = tl.where(p > 0, p * weighted, 0.0) + g_kl_yx * (p - q)
        tl.store(out_ptr + cols, (grad / temperature).to(grad_ptr.dtype.element_ty), mask=inside)


def token_divergences_forward(x, y, flags, temperature, out):
    """Launch the forward on logits `x` and ref_logits `y` [N, V] (unit column stride).

    `out` is float32 [10, N]: KL(pi||ref), KL(ref||pi), JS, TV, then what the backward
    reads -- both rows' maximum and log-sum (kept split), KL(pi||m) and sum pi sign(pi - ref).
    """
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    kl_xy, kl_yx, js, tv, c_x, ls_x, c_y, ls_y, kl_xm, sign_sum = out.unbind(0)
    block, warps = block_and_warps(n_cols, MAX_BLOCK)
    Launch(
        _token_divergences_forward_kernel, (n_rows,),
        (x, x.stride(0), y, y.stride(0), flags,
         kl_xy, kl_yx, js, tv, c_x, ls_x, c_y, ls_y, kl_xm, sign_sum,
         n_cols, temperature),
        dict(BLOCK=block), warps,
    )()


def token_divergences_backward(x, y, flags, lse, kl_xy, kl_xm, sign_sum, g_kl_xy, g_kl_yx, g_js, g_tv,
                               temperature, grad):
    """Launch the backward: write the gradient of sum(g . divergences) w.r.t. `x` into `grad` [N, V].

    `lse` is [4, N] (max and log-sum of x, then of y); the upstream gradients are float32 [N].
    """
    n_rows, n_cols = x.shape
    if n_rows == 0:
        return
    block, warps = block_and_warps(n_cols, MAX_BLOCK)
    Launch(
        _token_divergences_backward_kernel, (n_rows,),
        (x, x.stride(0), y, y.stride(0), flags,
         lse[0], lse[1], lse[2], lse[3], kl_xy, kl_xm, sign_sum,
         g_kl_xy, g_kl_yx, g_js, g_tv,
         grad, grad.stride(0), n_cols, temperature),
        dict(BLOCK=block), warps,
    )()


class TokenDivergencesFunction(torch.autograd.Function):
    """logits [N, V], ref_logits [N, V], row flags -> four float32 [N]; gradient to logits."""

    @staticmethod
    def forward(ctx, x, y, flags, temperature):
        out = torch.empty((10, x.shape[0]), dtype=torch.float32, device=x.device)
        token_divergences_forward(x, y, flags, temperature, out)
        kl_xy, kl_yx, js, tv, kl_xm, sign_sum = out[0], out[1], out[2], out[3], out[8], out[9]
        ctx.save_for_backward(x, y, flags, out[4:8], kl_xy, kl_xm, sign_sum)
        ctx.temperature = temperature
        return kl_xy, kl_yx, js, tv

    @staticmethod
    def backward(ctx, g_kl_xy, g_kl_yx, g_js, g_tv):
        x, y, flags, lse, kl_xy, kl_xm, sign_sum = ctx.saved_tensors
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        token_divergences_backward(
            x, y, flags, lse, kl_xy, kl_xm, sign_sum,
            upstream(g_kl_xy), upstream(g_kl_yx), upstream(g_js), upstream(g_tv),
            ctx.temperature, grad,
        )
        return grad, None, None, None


def token_divergences_triton(logits, ref_logits, *, temperature=1.0, mask=None):
    """The Triton path of `token_divergences` (same contract)."""
    reference.check_divergence_args(logits, ref_logits, mask)
    temperature = reference.check_temperature(temperature)
    lead = logits.shape[:-1]
    x = as_rows(logits)
    flags = row_flags(mask, x.shape[0], logits.device)
    outs = TokenDivergencesFunction.apply(x, as_rows(ref_logits.detach()), flags, temperature)
    return TokenDivergences(*(v.reshape(lead) for v in outs))


def token_divergences(logits, ref_logits, *, temperature=1.0, mask=None):
    """Per-token KL(pi||ref), KL(ref||pi), Jensen-Shannon and total variation (natural log).

    pi = softmax(logits / T), ref = softmax(ref_logits / T), both [..., V]; mask [...] bool
    (True = compute) or None. Returns a `TokenDivergences` of float32 [...] tensors; rows
    where mask is False are exact zeros with zero gradient. Gradient flows to `logits` only.
    """
    if use_triton(logits, ref_logits):
        return token_divergences_triton(logits, ref_logits, temperature=temperature, mask=mask)
    return reference.token_divergences(logits, ref_logits, temperature=temperature, mask=mask)
