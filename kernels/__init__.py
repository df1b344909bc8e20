"""Fused log-probability and divergence ops over a language model's vocabulary.

Public API (autograd-aware; outputs float32 whatever the input dtype; any leading
dimensions; ignored/masked rows are exact zeros with zero gradient):

- `token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False)`
- `sequence_logprobs(logits, targets, mask, *, temperature=1.0)`
- `linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
  ignore_index=-100, with_entropy=False, chunk_size=None)`
- `token_divergences(logits, ref_logits, *, temperature=1.0, mask=None)` -> `TokenDivergences`

CUDA tensors run the Triton kernels, everything else the torch reference in
`kernels.reference`; `set_backend` / `FDPIPE_KERNEL_BACKEND` force either (see
`kernels.backend`).
"""
from __future__ import annotations

from . import reference
from .backend import BackendError, get_backend, set_backend, use_triton
from .reference import TokenDivergences

__all__ = [
    "BackendError",
    "TokenDivergences",
    "get_backend",
    "linear_token_logprobs",
    "sequence_logprobs",
    "set_backend",
    "token_divergences",
    "token_logprobs",
]


def token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False):
    """log softmax(logits / T)[target] per token [...] (0 where ignored) [, entropy [...]]."""
    use_triton(logits)
    return reference.token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                    with_entropy=with_entropy)


def sequence_logprobs(logits, targets, mask, *, temperature=1.0):
    """Per-sequence sum of log p(target) over `mask`: logits [..., T, V] -> [...]."""
    reference.check_sequence_args(logits, targets, mask)
    masked = targets.masked_fill(~mask, -1)
    return token_logprobs(logits, masked, temperature=temperature, ignore_index=-1).sum(dim=-1)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          with_entropy=False, chunk_size=None):
    """`token_logprobs(hidden @ weight.T + bias, targets)` without materialising [N, V] logits."""
    use_triton(hidden, weight)
    return reference.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, with_entropy=with_entropy,
                                           chunk_size=chunk_size)


def token_divergences(logits, ref_logits, *, temperature=1.0, mask=None):
    """Per-token KL(pi||ref), KL(ref||pi), JS, TV as a `TokenDivergences` of float32 [...]."""
    use_triton(logits, ref_logits)
    return reference.token_divergences(logits, ref_logits, temperature=temperature, mask=mask)
