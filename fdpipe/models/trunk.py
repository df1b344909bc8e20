"""A decoder split into a frozen trunk and a head, so that the trunk is computed once.

When only the last ``k`` of ``L`` decoder blocks train, the policy's embeddings and first
``L − k`` blocks are the frozen base's. Their output, the hidden states entering block
``L − k``, is then the same for the policy and for the base on the same tokens: alignment
computes it once (or reads it off the KV-cached sampling pass, which computes it for every
position anyway) and runs only the head — the last ``k`` blocks, the final norm and the
LM head — of each model on it.

`TrunkSplit` handles Llama-style Hugging Face causal LMs (``model.model`` with
``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``; ``model.lm_head``): Llama, Mistral,
Qwen2, SmolLM. Anything else (the toy model, GPT-2) gets ``None`` from `TrunkSplit.of`, and
callers keep the full forward.

Masks and positions: the head runs with the causal mask combined with the padding mask
(additive, the dtype's lowest value where a key is hidden) and rotary embeddings at the
given position ids, as the full model does. A query on a padding position sees itself
only, so its row stays finite; such rows are never read.
"""
from __future__ import annotations

import contextlib

import torch


def _backbone(model):
    inner = getattr(model, "model", None)
    if inner is None or getattr(model, "lm_head", None) is None:
        return None
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    return inner


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same parameters, value for value."""
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb))


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, T, T]``: 0 where query i may see key j (j ≤ i, j not padding,
    or j = i), the dtype's lowest value elsewhere."""
    t = attention_mask.shape[1]
    device = attention_mask.device
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=device)[None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class TrunkSplit:
    """The first ``num_layers − head_layers`` blocks (with the embeddings) as a shared trunk.

    Args:
        model: a Llama-style causal LM whose trunk is frozen (the base); its modules compute
            the trunk.
        head_layers: ``k``, the number of last blocks that make up each model's head.
    """

    def __init__(self, model, head_layers: int):
        backbone = _backbone(model)
        if backbone is None:
            raise ValueError(f"{type(model).__name__} is not a Llama-style causal LM")
        n = len(backbone.layers)
        if not 0 <= head_layers <= n:
            raise ValueError(f"head_layers must lie in [0, {n}], got {head_layers}")
        self.model = model
        self.num_layers = n
        self.head_layers = int(head_layers)
        self.boundary = n - self.head_layers   # index of the first head block

    @classmethod
    def of(cls, model, train_layers: int) -> "TrunkSplit | None":
        """The split for a model whose last `train_layers` blocks train, or None where there is
        nothing to share (``train_layers == -1``: everything trains) or the architecture is not
        Llama-style."""
        backbone = _backbone(model)
        if train_layers < 0 or backbone is None or train_layers > len(backbone.layers):
            return None
        return cls(model, train_layers)

    @classmethod
    def common(cls, model, other) -> "TrunkSplit | None":
        """The split of `model` whose trunk is the longest run of first blocks (embeddings
        included) equal in `model` and `other`; None when the embeddings differ or either is not
        Llama-style. ``common(m, m)`` leaves only the final norm and LM head in the head."""
        mine, theirs = _backbone(model), _backbone(other)
        if mine is None or theirs is None or len(mine.layers) != len(theirs.layers):
            return None
        if not _equal(mine.embed_tokens, theirs.embed_tokens):
            return None
        boundary = 0
        while boundary < len(mine.layers) and _equal(mine.layers[boundary], theirs.layers[boundary]):
            boundary += 1
        return cls(model, len(mine.layers) - boundary)

    def shares_trunk_with(self, other) -> bool:
        """True when `other` has the same architecture and trunk weights equal to this split's."""
        mine, theirs = _backbone(self.model), _backbone(other)
        if theirs is None or len(theirs.layers) != self.num_layers:
            return False
        pairs = [(mine.embed_tokens, theirs.embed_tokens)]
        pairs += [(mine.layers[i], theirs.layers[i]) for i in range(self.boundary)]
        return all(_equal(a, b) for a, b in pairs)

    def trunk_frozen(self, model) -> bool:
        """True when none of `model`'s trunk parameters (embeddings, first blocks) trains."""
        backbone = _backbone(model)
        modules = [backbone.embed_tokens] + [backbone.layers[i] for i in range(self.boundary)]
        return not any(p.requires_grad for m in modules for p in m.parameters())

    # ------------------------------------------------------------------ trunk
    @torch.no_grad()
    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block ``boundary``, ``[B, T, H]``, for every position."""
        backbone = _backbone(self.model)
        hidden = backbone.embed_tokens(input_ids)
        if self.boundary == 0:
            return hidden
        return self._blocks(backbone, range(self.boundary), hidden, attention_mask, position_ids)

    @contextlib.contextmanager
    def capture(self, model):
        """Record, during every forward call of `model` inside the block, the hidden states
        entering block ``boundary`` (the trunk's output); yields the list of ``[B, t, H]``
        chunks in call order (one per call: a prefill, then one per decoding step)."""
        backbone = _backbone(model)
        chunks: list[torch.Tensor] = []
        if self.boundary == 0:
            module = backbone.embed_tokens
        else:
            module = backbone.layers[self.boundary - 1]

        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            chunks.append(out.detach())

        handle = module.register_forward_hook(hook)
        try:
            yield chunks
        finally:
            handle.remove()

    # ------------------------------------------------------------------ head
    def head(self, model, hidden: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor) -> torch.Tensor:
        """`model`'s last ``head_layers`` blocks and final norm on trunk hidden states: the
        final hidden states ``[B, T, H]`` (before the LM head), differentiable in `model`'s
        trainable parameters."""
        backbone = _backbone(model)
        hidden = self._blocks(backbone, range(self.boundary, self.num_layers), hidden, attention_mask,
                              position_ids)
        return backbone.norm(hidden)

    @staticmethod
    def _blocks(backbone, indices, hidden, attention_mask, position_ids):
        bias = attention_bias(attention_mask, hidden.dtype)
        rotary = backbone.rotary_emb(hidden, position_ids=position_ids)
        for i in indices:
            out = backbone.layers[i](hidden, attention_mask=bias, position_ids=position_ids,
                                     position_embeddings=rotary, use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def output_head(model) -> torch.nn.Linear:
    """The LM head (``lm_head``) of a Llama-style causal LM."""
    return model.lm_head
