"""Mixed precision (``precision: bf16``): autocast forward passes, float32 log-probabilities.

The bound: on the tiny 2-layer LM with its logits scaled to a standard deviation of about 2
(the final norm's weight times 20), bf16 and fp32 sequence log-probabilities of the same
samples under the same weights differ by at most 2^-6 nats per completion token (measured:
0.0045), and per-token entropies by at most 2^-4 nats (measured: 0.029); they must differ at
all, or bf16 did not run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import tiny_assets
from fdpipe.common.errors import ConfigError
from fdpipe.fdpg.aligner import AlignConfig
from fdpipe.models import causal_lm, precision
from fdpipe.models.policy import CausalPolicy
from fdpipe.stages import evaluate, reward, sft
from fdpipe.training import optim
from fdpipe.training.distributed import World

PER_TOKEN_BOUND = 2.0 ** -6


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tiny_assets.build_tiny_lm(tmp_path_factory.mktemp("precision") / "lm")
    model, tok = causal_lm.load_causal_lm(path), causal_lm.load_tokenizer(path)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)   # logits of a trained model's size (sd ~ 2), not ~0.1
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("The film", "A", "I really", "What")]
    return model, tok, prompts


def test_fp32_is_plain_float32_and_bf16_is_cpu_autocast():
    assert isinstance(precision.autocast("fp32", "cpu"), contextlib.nullcontext)
    with precision.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert precision.upcast(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32
    x = torch.zeros(2)
    assert precision.upcast(x) is x


def test_bf16_sequence_logprobs_stay_within_the_bound_of_fp32(lm):
    model, tok, prompts = lm
    fp32 = CausalPolicy.for_tokenizer(model, tok, max_new_tokens=12)
    bf16 = CausalPolicy.for_tokenizer(model, tok, max_new_tokens=12, precision="bf16")
    samples = fp32.sample(prompts, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = fp32.score(samples, with_entropy=True)
        b = bf16.score(samples, with_entropy=True, keep_logits=True)
    assert b.logprobs.dtype == torch.float32 and b.logits.dtype == torch.float32   # upcast before log-softmax
    per_token = (a.logprobs - b.logprobs).abs() / samples.lengths().float()
    assert 0 < float(per_token.max()) <= PER_TOKEN_BOUND
    assert float((a.entropy - b.entropy).abs().max()) <= 2.0 ** -4


def test_bf16_sampling_logprobs_match_the_bf16_training_forward(lm):
    """The gap metric of alignment (sampling vs training log-probs) stays small in bf16."""
    model, tok, prompts = lm
    bf16 = CausalPolicy.for_tokenizer(model, tok, max_new_tokens=12, precision="bf16")
    samples = bf16.sample(prompts, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap = (bf16.score(samples).logprobs - samples.sample_logprobs).abs() / samples.lengths().float()
    assert float(gap.max()) <= PER_TOKEN_BOUND


def test_bf16_training_keeps_float32_weights_and_gradients(lm):
    model, tok, _ = lm
    batch = sft.collate(sft.encode_examples(tok, ["The film", "A"], [" was good.", " bad movie."], 24),
                        tok.pad_token_id)
    optimizer = optim.adamw(model.parameters(), 1e-3)
    losses = {}
    for name in ("fp32", "bf16"):
        losses[name] = float(sft.accumulate_gradients(model, batch, None, name, World(), step=1, state_path="s.pt",
                                                      optimizer=optimizer))
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


@pytest.mark.parametrize("check,key", [
    (lambda: AlignConfig.from_config({"precision": "fp16"}, "alignment.runs.x"), "alignment.runs.x.precision"),
    (lambda: evaluate.EvalConfig.from_dict({"precision": "half"}), "evaluation.precision"),
    (lambda: reward.RewardConfig.from_dict({"precision": "fp16"}), "reward.precision"),
    (lambda: sft.check_config({**SFT_OK, "precision": "bf32"}), "sft.precision"),
])
def test_a_bad_precision_names_its_key(check, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        check()


SFT_OK = {"steps": 1, "batch_size": 1, "warmup_steps": 0, "max_length": 8, "eval_every": 1, "eval_batches": 1,
          "checkpoint_every": 1, "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "train_layers": -1}
