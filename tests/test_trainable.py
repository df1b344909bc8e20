"""One trainable-parameter selection for causal LMs and encoders, and the eval-mode switch."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import tiny_assets
from fdpipe.common.errors import ConfigError
from fdpipe.models import causal_lm
from fdpipe.models.trainable import eval_mode, set_trainable


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return causal_lm.load_causal_lm(tiny_assets.build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny"))


def test_causal_lm_last_blocks_and_norm(tiny_lm):
    params = set_trainable(tiny_lm, 1, key="sft.train_layers")
    names = {n for n, p in tiny_lm.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.layers.1.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names and len(params) == len(names)
    assert not tiny_lm.model.embed_tokens.weight.requires_grad   # tied to the LM head: frozen
    assert len(set_trainable(tiny_lm, -1, key="sft.train_layers")) == len(list(tiny_lm.parameters()))
    assert set_trainable(tiny_lm, 0, key="k") == [tiny_lm.model.norm.weight]
    with pytest.raises(ConfigError, match="'alignment.runs.x.train_layers': expected -1, or at most the model's 2"):
        set_trainable(tiny_lm, 3, key="alignment.runs.x.train_layers")


def test_encoder_with_head():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=1))
    set_trainable(model, -1, key="reward.train_layers", train_head=True)
    assert all(p.requires_grad for p in model.parameters())
    set_trainable(model, 1, key="reward.train_layers", train_head=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("bert.embeddings.") for n in frozen)
    assert any(n.startswith("bert.encoder.layer.0.") for n in frozen)
    assert not any(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in frozen)
    set_trainable(model, 0, key="reward.train_layers", train_head=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("bert.pooler.") for n in trained)


def test_eval_mode_restores_the_mode(tiny_lm):
    tiny_lm.train()
    with eval_mode(tiny_lm):
        assert not tiny_lm.training and not torch.is_grad_enabled()
    assert tiny_lm.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), eval_mode(tiny_lm):
        raise RuntimeError
    assert tiny_lm.training
