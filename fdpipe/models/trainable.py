"""Which parameters train, and switching a model to evaluation for a while.

`set_trainable` is the one place every stage chooses its trainable parameters: the last
``k`` transformer blocks and what follows them (final norm, pooler), optionally the output
head, everything with ``k = -1``. `TrainSpec` is what a stage's config asks for: ``full``,
``last_layers`` (`set_trainable`) or ``lora`` (adapters, `fdpipe.models.lora`); a section
without ``train`` keeps reading ``train_layers`` as before.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from fdpipe.common.errors import ConfigError


MODES = ("full", "last_layers", "lora")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What trains: every parameter (``full``), the last `layers` blocks (``last_layers``), or
    LoRA adapters of rank `rank` (scaled by ``alpha / rank``, dropout `dropout`) on
    `target_modules` (None: peft's default for the architecture) of the last `layers` blocks
    (None: every block), the model's own weights frozen (``lora``)."""

    mode: str = "last_layers"
    layers: int | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    layers_key: str = dataclasses.field(default="train_layers", compare=False)   # where `layers` was read

    @property
    def train_layers(self) -> int:
        """The equivalent ``train_layers`` of a ``full`` or ``last_layers`` spec."""
        return -1 if self.mode == "full" else int(self.layers)


def train_spec(cfg: dict, key: str) -> TrainSpec:
    """The `TrainSpec` of a stage's config section (`key`, e.g. ``sft``, names it in errors).

    Without ``train`` (or with ``train: null``), ``train_layers`` decides as it always did:
    -1 is ``full``, k is ``last_layers`` with k blocks. With ``train``, its ``mode`` decides and
    ``train_layers`` is only the default of ``train.layers`` for ``last_layers``.
    """
    train_layers = cfg.get("train_layers", -1)
    train = cfg.get("train")
    if train is None:
        if not isinstance(train_layers, int) or isinstance(train_layers, bool) or train_layers < -1:
            raise ConfigError(f"{key}.train_layers", "an integer >= 0, or -1 for all parameters", train_layers)
        return TrainSpec(mode="full" if train_layers == -1 else "last_layers", layers=train_layers)
    if not isinstance(train, dict):
        raise ConfigError(f"{key}.train", "a mapping with a mode (full, last_layers or lora), or null", train)
    known = {f.name for f in dataclasses.fields(TrainSpec)}
    unknown = sorted(set(train) - known)
    if unknown:
        raise ConfigError(f"{key}.train.{unknown[0]}", f"one of the known keys ({', '.join(sorted(known))})")
    mode = train.get("mode", "last_layers")
    if mode not in MODES:
        raise ConfigError(f"{key}.train.mode", f"one of {', '.join(MODES)}", mode)
    layers = train.get("layers", train_layers if mode == "last_layers" else None)
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < -1 or layers == 0):
        raise ConfigError(f"{key}.train.layers", "a positive integer, -1 (every block) or null", layers)
    if mode == "last_layers" and (layers is None or layers == -1):
        mode, layers = "full", -1
    if mode == "full":
        layers = -1
    if mode == "lora" and layers == -1:
        layers = None
    rank, alpha, dropout = train.get("rank", 8), train.get("alpha", 16.0), train.get("dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"{key}.train.rank", "a positive integer", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ConfigError(f"{key}.train.alpha", "a number > 0", alpha)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"{key}.train.dropout", "a number in [0, 1)", dropout)
    targets = train.get("target_modules")
    if isinstance(targets, list):
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"{key}.train.target_modules", "null, a module name pattern or a list of names", targets)
        targets = tuple(targets)
    elif targets is not None and not (isinstance(targets, str) and targets):
        raise ConfigError(f"{key}.train.target_modules", "null, a module name pattern or a list of names", targets)
    return TrainSpec(mode=mode, layers=layers, rank=rank, alpha=float(alpha), dropout=float(dropout),
                     target_modules=targets, layers_key="train.layers" if "layers" in train else "train_layers")


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
