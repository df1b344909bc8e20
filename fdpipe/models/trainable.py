"""Which parameters train, and switching a model to evaluation for a while.

`set_trainable` is the one place every stage chooses its trainable parameters: the last
``k`` transformer blocks and what follows them (final norm, pooler), optionally the output
head, everything with ``k = -1``. Later features that change what trains (adapters) plug in here.
"""
from __future__ import annotations

import contextlib

import torch

from fdpipe.common.errors import ConfigError


def transformer_blocks(model) -> torch.nn.ModuleList | None:
    """The backbone's blocks: the first ModuleList of ``config.num_hidden_layers`` modules in
    ``model.base_model`` (``layers`` of Llama, ``h`` of GPT-2, ``encoder.layer`` of BERT)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def set_trainable(model, train_layers: int, *, key: str, train_head: bool = False) -> list[torch.nn.Parameter]:
    """Train the last `train_layers` blocks and the backbone's modules after them; -1 trains all.

    Parameters of the backbone (``model.base_model``) registered before the first block (the
    embeddings) and those of the lower blocks are frozen; the upper blocks and what comes
    after them (final norm, pooler) train. Parameters outside the backbone (an LM head or a
    scalar head) train only when `train_head` is true — a causal LM's head, often tied to the
    input embeddings, stays frozen. `key` is the config key named in errors. Returns the
    trainable parameters in model order.
    """
    if train_layers == -1:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    blocks = transformer_blocks(model)
    if blocks is None or train_layers > len(blocks):
        found = len(blocks) if blocks is not None else 0
        raise ConfigError(key, f"-1, or at most the model's {found} transformer blocks", train_layers)
    for p in model.parameters():
        p.requires_grad_(train_head)
    first_trained = len(blocks) - train_layers
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    before_blocks = True
    for p in model.base_model.parameters():
        if id(p) in block_of:
            before_blocks = False
            p.requires_grad_(block_of[id(p)] >= first_trained)
        else:
            p.requires_grad_(not before_blocks)
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluation mode and no gradients inside the block; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
