"""Plain-torch implementations of every kernel op: the CPU path and the test oracle.

Each function computes in float64 when its input is float64 and in float32 otherwise, and
returns `out_dtype` (float32 by default; `out_dtype=None` keeps the compute dtype, which is
what the float64 oracle tests and `gradcheck` use). Leading dimensions are flattened and
restored. Ignored or masked rows give exact zeros and receive exact zero gradients, because
their logits are replaced by zeros *before* any arithmetic (so even a row of `-inf` there
cannot produce a NaN). A row whose kept logits are all `-inf` is not a distribution and
gives NaN.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "TokenDivergences",
    "compute_dtype",
    "linear_token_logprobs",
    "sequence_logprobs",
    "token_divergences",
    "token_logprobs",
]


class TokenDivergences(NamedTuple):
    """Per-token divergences between pi = softmax(logits/T) and ref = softmax(ref_logits/T)."""

    kl_pi_ref: torch.Tensor
    kl_ref_pi: torch.Tensor
    js: torch.Tensor
    tv: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_temperature(temperature) -> float:
    """A positive finite Python number, else a one-line ValueError."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    return value


def check_token_shapes(logits: torch.Tensor, targets: torch.Tensor, name: str = "logits") -> None:
    """`targets` must have the leading shape of `logits` ([..., V] vs [...]) and be integer."""
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"{name} {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
            f"expected {name} [..., V] and targets [...] with the same leading shape"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer tensor, got {targets.dtype}")


def _masked_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`x` with the rows where `keep` is False replaced by zeros (a new tensor)."""
    return torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _token_logprobs_2d(x, t, keep, temperature, with_entropy):
    """Core on a [N, V] compute-dtype tensor; returns (logp [N], entropy [N] or None)."""
    x = _masked_rows(x, keep)
    if temperature != 1.0:
        x = x / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    safe_t = torch.where(keep, t, torch.zeros_like(t))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    logp = torch.where(keep, logp_all.gather(1, safe_t[:, None]).squeeze(1), zero)
    if not with_entropy:
        return logp, None
    # p * log p is 0 where the logit is -inf; substituting 0 *before* the product keeps
    # both the value and its gradient free of 0 * inf.
    finite_logp = torch.where(x > float("-inf"), logp_all, zero)
    entropy = -(logp_all.exp() * finite_logp).sum(dim=-1)
    return logp, torch.where(keep, entropy, zero)


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False,
                   out_dtype=torch.float32):
    """log softmax(logits / T)[target] per token, 0 where `targets == ignore_index`.

    logits [..., V], targets [...] (int). Returns logp [...] or (logp, entropy) when
    `with_entropy`; entropy is that of softmax(logits / T), 0 on ignored rows.
    """
    check_token_shapes(logits, targets)
    temperature = check_temperature(temperature)
    lead, vocab = targets.shape, logits.shape[-1]
    x = logits.reshape(-1, vocab).to(compute_dtype(logits.dtype))
    t = targets.reshape(-1).long()
    logp, entropy = _token_logprobs_2d(x, t, t != ignore_index, temperature, with_entropy)
    cast = (lambda v: v.reshape(lead)) if out_dtype is None else (lambda v: v.to(out_dtype).reshape(lead))
    return (cast(logp), cast(entropy)) if with_entropy else cast(logp)


def sequence_logprobs(logits, targets, mask, *, temperature=1.0, out_dtype=torch.float32):
    """Sum over the last dimension of log p(target) where `mask` is True.

    logits [..., T, V], targets [..., T] (already aligned with logits), mask [..., T] bool.
    Returns [...].
    """
    check_sequence_args(logits, targets, mask)
    masked = torch.where(mask, targets.long(), torch.full_like(targets, -1, dtype=torch.long))
    logp = token_logprobs(logits, masked, temperature=temperature, ignore_index=-1, out_dtype=None)
    total = logp.sum(dim=-1)
    return total if out_dtype is None else total.to(out_dtype)


def check_sequence_args(logits, targets, mask) -> None:
    """Shapes for `sequence_logprobs`: logits [..., T, V], targets and mask [..., T], mask bool."""
    if targets.dim() < 1:
        raise ValueError(f"targets {tuple(targets.shape)}: expected [..., T] with at least one dimension")
    check_token_shapes(logits, targets)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(
            f"mask {tuple(mask.shape)} {mask.dtype}: expected a bool tensor shaped like targets {tuple(targets.shape)}"
        )


def check_linear_args(hidden, weight, targets, bias) -> None:
    """Shapes for `linear_token_logprobs`: hidden [..., H], weight [V, H], targets [...], bias [V]."""
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected hidden [..., H] and weight [V, H]"
        )
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}: expected the same leading shape"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets: expected an integer tensor, got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)}: expected [V] = ({weight.shape[0]},)")


# Default chunk: at most this many logits (rows x V) exist at once.
CHUNK_ELEMENTS = 2**25


def default_chunk_size(n_rows: int, vocab: int) -> int:
    """Rows per chunk so that one chunk of logits holds at most `CHUNK_ELEMENTS` values."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


class ReferenceLinearTokenLogprobsFunction(torch.autograd.Function):
    """Chunked LM head + log-probabilities; only inputs are saved, each chunk is recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy, chunk):
        cdt = compute_dtype(hidden.dtype)
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=cdt, device=hidden.device)
        entropy = torch.zeros(n if with_entropy else 0, dtype=cdt, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = hidden[start:end].to(cdt) @ w.T
            if b is not None:
                logits = logits + b
            t = targets[start:end]
            lp, ent = _token_logprobs_2d(logits, t, t != ignore_index, temperature, with_entropy)
            logp[start:end] = lp
            if with_entropy:
                entropy[start:end] = ent
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.args = (temperature, ignore_index, with_entropy, chunk)
        ctx.mark_non_differentiable(*([] if with_entropy else [entropy]))
        ctx.set_materialize_grads(False)   # an unused output (entropy, often) arrives as None: not differentiated
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        temperature, ignore_index, with_entropy, chunk = ctx.args
        with_entropy = with_entropy and grad_entropy is not None
        cdt = compute_dtype(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.detach().to(cdt).requires_grad_(need_w)
        b = None if bias is None else bias.detach().to(cdt).requires_grad_(need_b)
        grad_hidden = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=cdt, device=b.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[start:end].detach().to(cdt).requires_grad_(need_h)
                logits = h @ w.T
                if b is not None:
                    logits = logits + b
                t = targets[start:end]
                lp, ent = _token_logprobs_2d(logits, t, t != ignore_index, temperature, with_entropy)
                outputs, grads = [], []
                if grad_logp is not None:
                    outputs.append(lp)
                    grads.append(grad_logp[start:end].to(cdt))
                if with_entropy:
                    outputs.append(ent)
                    grads.append(grad_entropy[start:end].to(cdt))
                wanted = [v for v, need in ((h, need_h), (w, need_w), (b, need_b)) if need]
                got = iter(torch.autograd.grad(outputs, wanted, grads))
            if need_h:
                grad_hidden[start:end] = next(got)
            if need_w:
                grad_w += next(got)
            if need_b:
                grad_b += next(got)
        return (
            None if grad_hidden is None else grad_hidden.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None,
        )


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          with_entropy=False, chunk_size=None, out_dtype=torch.float32):
    """`token_logprobs(hidden @ weight.T + bias, targets)` computed `chunk_size` rows at a time.

    hidden [..., H], weight [V, H], bias [V] or None, targets [...]. The full [N, V] logits
    never exist: the forward keeps only the per-token results, the backward recomputes each
    chunk's logits. Gradients flow to hidden, weight and bias.
    """
    check_linear_args(hidden, weight, targets, bias)
    temperature = check_temperature(temperature)
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    chunk = default_chunk_size(h.shape[0], weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    logp, entropy = ReferenceLinearTokenLogprobsFunction.apply(h, weight, bias, t, temperature, ignore_index, with_entropy, chunk)
    cast = (lambda v: v.reshape(lead)) if out_dtype is None else (lambda v: v.to(out_dtype).reshape(lead))
    return (cast(logp), cast(entropy)) if with_entropy else cast(logp)


def check_divergence_args(logits, ref_logits, mask) -> None:
    """logits and ref_logits [..., V] of the same shape; mask None or bool [...]."""
    if logits.dim() < 1 or tuple(logits.shape) != tuple(ref_logits.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)}: expected the same shape [..., V]"
        )
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(logits.shape[:-1])):
        raise ValueError(
            f"mask {tuple(mask.shape)} {mask.dtype}: expected a bool tensor shaped {tuple(logits.shape[:-1])}"
        )


def token_divergences(logits, ref_logits, *, temperature=1.0, mask=None, out_dtype=torch.float32):
    """Per-token KL(pi||ref), KL(ref||pi), Jensen-Shannon and total variation (natural log).

    pi = softmax(logits / T), ref = softmax(ref_logits / T), both [..., V]; mask [...] bool
    (True = compute) or None. Rows where mask is False are exact zeros. The gradient flows to
    `logits` only; `ref_logits` is a constant.
    """
    check_divergence_args(logits, ref_logits, mask)
    temperature = check_temperature(temperature)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    cdt = compute_dtype(logits.dtype)
    x = logits.reshape(-1, vocab).to(cdt)
    y = ref_logits.detach().reshape(-1, vocab).to(cdt)
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1)
    x, y = _masked_rows(x, keep), _masked_rows(y, keep)
    if temperature != 1.0:
        x, y = x / temperature, y / temperature
    lp, lq = torch.log_softmax(x, dim=-1), torch.log_softmax(y, dim=-1)
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=cdt, device=x.device)
    on_p, on_q = lp > float("-inf"), lq > float("-inf")
    # Every `where` below replaces a term that would be 0 * inf (or inf - inf) by 0 before the
    # product, so neither the value nor its gradient sees a NaN.
    kl_pq = (p * torch.where(on_p, lp - lq, zero)).sum(-1)
    kl_qp = (q * torch.where(on_q, lq - lp, zero)).sum(-1)
    off = ~(on_p | on_q)
    lm = torch.logaddexp(torch.where(off, zero, lp), torch.where(off, zero, lq)) - math.log(2.0)
    js = 0.5 * (p * torch.where(on_p, lp - lm, zero)).sum(-1) + 0.5 * (q * torch.where(on_q, lq - lm, zero)).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)

    def finish(v):
        v = torch.where(keep, v, zero).reshape(lead)
        return v if out_dtype is None else v.to(out_dtype)

    return TokenDivergences(finish(kl_pq), finish(kl_qp), finish(js), finish(tv))
