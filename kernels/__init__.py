"""Fused log-probability and divergence ops over a language model's vocabulary.

Public API (autograd-aware; outputs float32 whatever the input dtype; any leading
dimensions; ignored/masked rows are exact zeros with zero gradient):

- `token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, with_entropy=False)`
- `sequence_logprobs(logits, targets, mask, *, temperature=1.0)`
- `linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
  ignore_index=-100, with_entropy=False, chunk_size=None)`
- `token_divergences(logits, ref_logits, *, temperature=1.0, mask=None)` -> `TokenDivergences`

CUDA tensors run the Triton kernels, everything else the torch reference in
`fdpipe_kernels.reference`; `set_backend` / `FDPIPE_KERNEL_BACKEND` force either (see
`fdpipe_kernels.backend`).

The source folder is `kernels/`, but it installs (and imports) as `fdpipe_kernels`: the
import name `kernels` belongs to another PyPI distribution (Hugging Face's hub kernels).
"""
from __future__ import annotations

from . import reference
from .backend import BackendError, get_backend, set_backend
from .linear_token_logprobs import linear_token_logprobs
from .reference import TokenDivergences
from .token_divergences import token_divergences
from .token_logprobs import sequence_logprobs, token_logprobs

__all__ = [
    "BackendError",
    "TokenDivergences",
    "get_backend",
    "linear_token_logprobs",
    "reference",
    "sequence_logprobs",
    "set_backend",
    "token_divergences",
    "token_logprobs",
]
