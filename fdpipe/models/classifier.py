"""A Hugging Face text classifier as a feature: the probability of one label for each text.

Any ``AutoModelForSequenceClassification`` folder or cached Hub name loads. The probability
of a label is the softmax over the logits, or the sigmoid of the single logit of a one-output
head (what ``transformers``' text-classification pipeline applies). Errors name the config
key of the feature that asked for the classifier.
"""
from __future__ import annotations

import torch

from fdpipe.common.errors import ConfigError
from fdpipe.common.runtime import pick_device
from fdpipe.models.trainable import eval_mode


class TextClassifier:
    """A sequence classifier and its tokenizer; `probabilities` scores texts in batches."""

    def __init__(self, model, tokenizer, *, max_length: int = 512):
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def labels(self) -> dict[int, str]:
        """Label index → name (``config.id2label``)."""
        return {int(i): str(name) for i, name in self.model.config.id2label.items()}

    @classmethod
    def load(cls, name_or_path: str, device="cpu", *, key: str = "model") -> "TextClassifier":
        """Load a classifier; `key` (e.g. ``alignment.features.positive.model``) is named in errors."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=torch.float32)
        except Exception as exc:  # transformers raises OSError, ValueError, ... for missing or broken models
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(key, f"a text-classification model folder or cached Hub name "
                                   f"({type(exc).__name__}: {reason[:200]})", name_or_path) from None
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(key, "a classifier whose tokenizer has a pad or EOS token", name_or_path)
            tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
        model.to(pick_device(str(device))).eval()
        positions = getattr(model.config, "max_position_embeddings", None) or 512
        return cls(model, tokenizer, max_length=min(tokenizer.model_max_length, positions, 512))

    def label_index(self, label, key: str = "label") -> int:
        """Index of `label` (a name of ``id2label``, or an index); ConfigError naming `key` otherwise."""
        labels = self.labels
        if isinstance(label, int) and not isinstance(label, bool) and label in labels:
            return label
        for index, name in labels.items():
            if name == label:
                return index
        raise ConfigError(key, f"a label of the classifier ({', '.join(labels.values())})", label)

    def probabilities(self, texts: list[str], index: int, batch_size: int = 32) -> torch.Tensor:
        """P(label `index` | text) for each text: float64 CPU tensor [len(texts)], no grad.

        Texts go in batches of similar length; the result keeps the input order.
        """
        texts = list(texts)
        out = torch.empty(len(texts), dtype=torch.float64)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with eval_mode(self.model):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.double()
                probs = torch.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else torch.softmax(logits, -1)[:, index]
                out[idx] = probs.cpu()
        return out
