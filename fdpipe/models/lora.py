"""LoRA adapters (``train.mode: lora``) through `peft`, and the models a stage trains.

`prepare` turns a loaded model and a `fdpipe.models.trainable.TrainSpec` into a `Trainable`:
the module the stage runs (the model itself: peft injects the adapter layers into it in
place, so its class, its ``forward`` and ``base_model`` stay those of transformers), its
trainable parameters (only the adapters' with LoRA), and how to save it.

* Saving (`Trainable.save`): the folder holds the model with the adapters merged into its
  weights (``W + (alpha / rank) · B A``), so ``AutoModelForCausalLM.from_pretrained`` reloads it
  as a plain model, and the adapter itself in ``<folder>/adapter/`` (peft's
  ``adapter_config.json`` + ``adapter_model.safetensors``), for tools that want it separately.
* Alignment (`policy_and_base`): the frozen base ``a`` is the same model with its adapters
  disabled (peft's ``disable_adapter()``), `AdaptersDisabled`: one copy of the weights, not
  the two of a deep copy.
* Resume states hold the trainable tensors only (`fdpipe.training.checkpoint.trainable_tensors`),
  which with LoRA are the adapters' ``lora_A``/``lora_B`` matrices.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from pathlib import Path

import torch

from fdpipe.common.errors import ConfigError
from fdpipe.common.io import atomic_dir
from fdpipe.models.causal_lm import save_causal_lm
from fdpipe.models.trainable import TrainSpec, set_trainable, transformer_blocks

log = logging.getLogger("fdpipe.models")

ADAPTER_DIR = "adapter"


def add_adapters(model, spec: TrainSpec, *, key: str, head: bool = False):
    """Freeze `model` and inject LoRA adapters as `spec` says; returns the `peft.PeftModel`
    wrapping it (`model` itself now holds the adapter layers). `head`: a sequence classifier
    whose head trains in full beside the adapters (peft's ``SEQ_CLS`` task). `key` (e.g.
    ``sft.train``) is named in errors."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    layers = None
    if spec.layers is not None:
        blocks = transformer_blocks(model)
        found = len(blocks) if blocks is not None else 0
        if spec.layers > found:
            raise ConfigError(f"{key}.layers", f"null, or at most the model's {found} transformer blocks", spec.layers)
        layers = list(range(found - spec.layers, found))
        if isinstance(spec.target_modules, str):   # peft selects blocks only among listed module names
            raise ConfigError(f"{key}.target_modules", "a list of module names when train.layers is set",
                              spec.target_modules)
    targets = list(spec.target_modules) if isinstance(spec.target_modules, tuple) else spec.target_modules
    try:
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                            layers_to_transform=layers, bias="none", task_type="SEQ_CLS" if head else None)
        return get_peft_model(model, config)
    except ValueError as exc:   # no module matches target_modules, or no default for the architecture
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}.target_modules", f"modules of the model to adapt ({first})",
                          spec.target_modules) from None


@dataclasses.dataclass
class Trainable:
    """A model ready to train: `model` is what the stage runs, `params` what the optimizer
    updates; `peft` is the peft wrapper when adapters train (None otherwise)."""

    model: torch.nn.Module
    params: list
    peft: object = None

    def save(self, tokenizer, out_dir) -> Path:
        """``save_pretrained`` of the model (adapters merged) and tokenizer into `out_dir`,
        atomically, with the adapter in ``out_dir/adapter/``. Merging changes the model in
        place: call it once, when training is over."""
        if self.peft is None:
            return save_causal_lm(self.model, tokenizer, out_dir)
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            self.export(tmp).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        log.info("saved model (LoRA adapters merged), its adapter and tokenizer to %s", out_dir)
        return out_dir

    def export(self, folder):
        """The model to ``save_pretrained`` into `folder`: with adapters, their merge into the
        weights (in place), the adapter written to ``folder/adapter/`` first."""
        if self.peft is None:
            return self.model
        self.peft.save_pretrained(Path(folder) / ADAPTER_DIR)
        return self.peft.merge_and_unload()


def prepare(model, spec: TrainSpec, *, key: str, train_head: bool = False) -> Trainable:
    """Make `model` train as `spec` says (`key`: the config section, e.g. ``sft``)."""
    if spec.mode == "lora":
        peft_model = add_adapters(model, spec, key=f"{key}.train", head=train_head)
        inner = peft_model.get_base_model()
        return Trainable(inner, [p for p in inner.parameters() if p.requires_grad], peft_model)
    return Trainable(model, set_trainable(model, spec.train_layers, key=f"{key}.{spec.layers_key}",
                                          train_head=train_head))


class AdaptersDisabled(torch.nn.Module):
    """The model of a `peft.PeftModel` called with its adapters disabled and in eval mode:
    the frozen base of alignment, sharing every weight with the policy.

    Its ``train()`` only sets its own flag: the shared modules keep the policy's mode, and each
    call runs them in eval mode (no dropout) and puts the policy's mode back.
    """

    def __init__(self, peft_model):
        super().__init__()
        self.inner = peft_model.get_base_model()
        object.__setattr__(self, "_peft", peft_model)   # not a submodule: its parameters are inner's
        params = inspect.signature(self.inner.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        """The inner model's forward with the adapters disabled, in eval mode (``cache``: the
        key/value cache, passed under the name the inner model takes)."""
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        was_training = self.inner.training
        self.inner.eval()
        try:
            with self._peft.disable_adapter():
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        finally:
            self.inner.train(was_training)

    def train(self, mode: bool = True):
        self.training = mode
        return self


def policy_and_base(model, spec: TrainSpec, *, key: str) -> tuple[Trainable, torch.nn.Module]:
    """The policy to train and the frozen base of alignment, both starting from `model`.

    ``lora``: the policy is `model` with adapters, the base the same model with them disabled
    (`AdaptersDisabled`); otherwise the base is `model` frozen and the policy a deep copy of it
    with `spec`'s parameters trainable.
    """
    if spec.mode == "lora":
        trainable = prepare(model, spec, key=key)
        return trainable, AdaptersDisabled(trainable.peft)
    for p in model.parameters():
        p.requires_grad_(False)
    return prepare(copy.deepcopy(model), spec, key=key), model
