"""LM head fused with per-token log-probabilities, in chunks of rows.

For each chunk of `chunk_size` rows the logits `hidden @ weight.T + bias` are computed with
one matmul (in the input dtype), reduced by the token_logprobs Triton forward kernel
(`token_logprobs_forward`), and dropped: only the per-token log-probability, the
log-sum-exp and the entropy are kept. The backward recomputes each chunk's logits, turns
them into their gradient with the token_logprobs backward kernel
(`token_logprobs_backward`, into one reused chunk buffer), and accumulates

    grad_hidden[chunk] = grad_logits @ weight
    grad_weight       += grad_logits.T @ hidden[chunk]
    grad_bias         += grad_logits.sum(0)

so at most one [chunk_size, V] logits tensor and one gradient tensor of that size exist.
`grad_weight` accumulates in the weight's dtype (bf16/fp16 inputs therefore round once per
chunk); `grad_bias` accumulates in float32.
"""
from __future__ import annotations

import torch

from . import reference
from .backend import use_triton
from .launch import upstream
from .token_logprobs import token_logprobs_backward, token_logprobs_forward


def _chunk_logits(hidden, weight, bias, start, end):
    h = hidden[start:end]
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> (logp [N], entropy [N] or [0])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy, chunk):
        n_rows = hidden.shape[0]
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty((2, n_rows), dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n_rows if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            logits = _chunk_logits(hidden, weight, bias, start, end)
            token_logprobs_forward(logits, targets[start:end], temperature, ignore_index, with_entropy,
                                   logp[start:end], lse[:, start:end], entropy[start:end] if with_entropy else entropy)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.args = (temperature, ignore_index, with_entropy, chunk)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, with_entropy, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_logp = upstream(grad_logp)
        g_ent = upstream(grad_entropy) if with_entropy else None
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
        buffer = torch.empty((min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            logits = _chunk_logits(hidden, weight, bias, start, end)
            grad_logits = buffer[: end - start]
            token_logprobs_backward(
                logits, targets[start:end], lse[:, start:end], entropy[start:end] if with_entropy else entropy,
                g_logp[start:end], g_ent[start:end] if with_entropy else None,
                temperature, ignore_index, with_entropy, grad_logits,
            )
            del logits
            if need_h:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_w:
                grad_weight.addmm_(grad_logits.T, hidden[start:end])
            if need_b:
                grad_bias += grad_logits.sum(dim=0, dtype=torch.float32)
        return (
            grad_hidden,
            grad_weight,
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None,
        )


def linear_token_logprobs_triton(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                 with_entropy=False, chunk_size=None):
    """The Triton path of `linear_token_logprobs` (same contract)."""
    reference.check_linear_args(hidden, weight, targets, bias)
    temperature = reference.check_temperature(temperature)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"hidden {hidden.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}: "
            "expected one dtype for the matmul"
        )
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    chunk = reference.default_chunk_size(h.shape[0], weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    logp, entropy = LinearTokenLogprobsFunction.apply(h, weight, bias, t, temperature, int(ignore_index), with_entropy, chunk)
    return (logp.reshape(lead), entropy.reshape(lead)) if with_entropy else logp.reshape(lead)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          with_entropy=False, chunk_size=None):
    """`token_logprobs(hidden @ weight.T + bias, targets, ...)` without the full [N, V] logits.

    hidden [..., H], weight [V, H], bias [V] or None, targets [...] int. Returns float32 logp
    [...] (0 where ignored), or (logp, entropy) when `with_entropy`. `chunk_size` rows are
    processed at a time (default: as many as keep one chunk of logits under
    `reference.CHUNK_ELEMENTS` values). Gradients flow to hidden, weight and bias.
    """
    if use_triton(hidden, weight):
        return linear_token_logprobs_triton(hidden, weight, targets, bias=bias, temperature=temperature,
                                            ignore_index=ignore_index, with_entropy=with_entropy,
                                            chunk_size=chunk_size)
    return reference.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, with_entropy=with_entropy,
                                           chunk_size=chunk_size)
