"""Micro-batches (``micro_batch_size``): the same samples and the same update as whole batches.

Gradient accumulation scales each micro-batch's loss by its share of the batch, so the summed
gradient is the whole batch's. The models below run in float64 where they can; the kernels
return float32 log-probabilities and the losses are float32, so gradients and updated
parameters agree to float32 rounding: relative error <= 1e-5 of the largest entry.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import tiny_assets
from fdpipe.fdpg import toy
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.models import causal_lm
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.reward_model import resolve_backbone
from fdpipe.stages import reward, sft
from fdpipe.training import optim
from fdpipe.training.batches import length_groups, micro_batches
from fdpipe.training.distributed import World

RTOL = 1e-5   # of the largest entry: float32 losses and log-probabilities


def assert_close(a, b, rtol=RTOL):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= rtol * scale, (float((a - b).abs().max()), scale)


def test_micro_batches_cover_the_batch_once():
    assert micro_batches(7, None) == [slice(0, 7)]
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert micro_batches(2, 5) == [slice(0, 2)]


def test_length_groups_cover_the_rows_once_and_cut_padding():
    lengths = [40, 8, 41, 9, 10, 39, 7, 42]
    groups = length_groups(lengths, overhead=16)
    rows = torch.cat(groups).tolist()
    assert sorted(rows) == list(range(8))
    assert [sorted(lengths[i] for i in g.tolist()) for g in groups] == [[39, 40, 41, 42], [7, 8, 9, 10]]
    assert len(length_groups(lengths, overhead=10_000)) == 1          # one more pass never pays
    assert all(len(g) <= 3 for g in length_groups(lengths, max_rows=3))
    assert length_groups([]) == []


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = tiny_assets.build_tiny_lm(tmp_path_factory.mktemp("micro") / "lm")
    return causal_lm.load_causal_lm(path), causal_lm.load_tokenizer(path)


def test_sampling_and_scoring_in_micro_batches_give_the_same_samples(tiny_lm):
    model, tok = tiny_lm
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("The film", "A", "I really", "What")]
    out = {}
    for size in (None, 3):
        policy = CausalPolicy.for_tokenizer(model, tok, max_new_tokens=8, micro_batch_size=size)
        samples = policy.sample(prompts, 3, generator=torch.Generator().manual_seed(5))
        out[size] = samples, policy.score(samples, with_entropy=True, keep_logits=True)
    (whole, s_whole), (micro, s_micro) = out[None], out[3]
    assert torch.equal(micro.input_ids, whole.input_ids) and micro.texts == whole.texts
    assert torch.equal(micro.completion_mask, whole.completion_mask)
    torch.testing.assert_close(micro.sample_logprobs, whole.sample_logprobs, rtol=0, atol=1e-5)
    for name in ("logprobs", "entropy", "logits"):
        torch.testing.assert_close(getattr(s_micro, name), getattr(s_whole, name), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- alignment

SPACE = toy.ToySpace(num_content=3, num_prompts=2, max_length=3)


def _aligned_step(divergence: str, proposal: str, micro):
    """One step of the toy problem (float64 logit tables): samples drawn, gradient, new parameters."""
    problem = toy.build_problem(SPACE, Target(kind="rlhf", beta=1.0), model_seed=3, reward_seed=4)
    problem.policy.model.double()
    problem.base.model.double()
    cfg = AlignConfig(divergence=divergence, prompts_per_step=2, samples_per_prompt=16, lr=0.1, grad_clip=0.0,
                      proposal=proposal, micro_batch_size=micro)
    aligner = Aligner(problem.policy, problem.base, problem.reward, problem.target,
                      PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), 0), cfg,
                      generator=torch.Generator().manual_seed(0))
    drawn = []
    sample = aligner.policy.sample
    aligner.policy.sample = lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1]
    if aligner.proposal is not None:
        aligner.proposal.sample = aligner.policy.sample
    metrics = aligner.step()
    (param,) = problem.policy.trainable_parameters()
    return drawn[0], param.grad.clone(), param.detach().clone(), metrics


@pytest.mark.parametrize("divergence,proposal", [("rkl", "online"), ("fkl", "online"), ("js", "offline")])
def test_an_align_step_in_micro_batches_makes_the_whole_batch_update(divergence, proposal):
    """32 samples in micro-batches of 5 (the last one of 2): same samples, same gradient and
    parameters (relative 1e-5), same metrics; the pooled log Z and baselines are those of the batch."""
    s_whole, g_whole, p_whole, m_whole = _aligned_step(divergence, proposal, None)
    s_micro, g_micro, p_micro, m_micro = _aligned_step(divergence, proposal, 5)
    assert torch.equal(s_micro.input_ids, s_whole.input_ids)
    assert float(g_whole.abs().max()) > 1e-3          # a real gradient, not a vacuous match
    assert_close(g_micro, g_whole)
    assert_close(p_micro, p_whole)
    for key in ("objective", "loss", "log_z", "pseudo_reward_mean", "kl_pi_a", "logprob_gap", "entropy_per_token"):
        assert m_micro[key] == pytest.approx(m_whole[key], rel=1e-5, abs=1e-7, nan_ok=True), key


def test_micro_batch_size_must_be_positive():
    from fdpipe.common.errors import ConfigError

    with pytest.raises(ConfigError, match="'alignment.runs.x.micro_batch_size'"):
        AlignConfig.from_config({"micro_batch_size": 0}, "alignment.runs.x")


# ----------------------------------------------------------------------------- SFT and reward model

def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def test_sft_gradient_in_micro_batches_equals_the_batch_gradient(tiny_lm, tmp_path):
    model, tok = tiny_lm
    model = causal_lm.load_causal_lm(model.name_or_path, dtype=torch.float64).train()
    examples = sft.encode_examples(tok, ["The film", "A", "I", "What a", "It", "The end", "So"],
                                   [" was good and then it was not good at all, and then it was good again.",
                                    " bad movie.", " liked it a lot, a whole lot, more than any other film I saw.",
                                    " story.", " works.", " is near.",
                                    " dull and long and slow and dull and long and slow and dull and long."], 48)
    batch = sft.collate(examples, tok.pad_token_id)
    optimizer = optim.adamw(model.parameters(), 1e-3)
    out = {}
    for size in (None, 3):
        loss = sft.accumulate_gradients(model, batch, size, "fp32", World(), step=1, state_path=tmp_path / "s.pt",
                                        optimizer=optimizer)
        out[size] = float(loss), _grads(model)
    assert out[3][0] == pytest.approx(out[None][0], rel=1e-6)
    assert float(out[None][1].abs().max()) > 1e-3
    assert_close(out[3][1], out[None][1])
    # the reference: one forward over the whole padded batch, no length groups
    assert len(sft.row_groups(batch)) > 1
    optimizer.zero_grad(set_to_none=True)
    loss, _ = sft.completion_loss(model, batch)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(out[None][0], rel=1e-6)
    assert_close(out[None][1], _grads(model))


def test_reward_gradient_in_micro_batches_equals_the_batch_gradient(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("embedded"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=1,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # dropout draws differ per pass
    model = BertForSequenceClassification(cfg).double().train()
    chosen = ["A wonderful film.", "Great acting", "I loved every minute of it.", "Superb.", "Moving story."]
    rejected = ["Dull.", "A terrible, boring film.", "Awful", "I hated it.", "Bad script and worse acting."]
    enc = tokenizer(chosen + rejected, padding=True, return_tensors="pt")
    optimizer = optim.adamw(model.parameters(), 1e-3)
    out = {}
    for size in (None, 2):
        config = reward.RewardConfig(center_coef=0.1, micro_batch_size=size)
        r_c, r_r = reward.accumulate_gradients(model, enc, 5, 5, config, World(), step=1,
                                               state_path=tmp_path / "s.pt", optimizer=optimizer)
        out[size] = torch.cat([r_c, r_r]), _grads(model)
    torch.testing.assert_close(out[2][0], out[None][0], rtol=0, atol=1e-6)
    assert float(out[None][1].abs().max()) > 1e-4
    assert_close(out[2][1], out[None][1])


def test_reward_in_length_groups_equals_one_padded_forward():
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("embedded"))
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=128, num_labels=1,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).double().train()
    long = "a long and winding review that goes on and on about the plot, the cast and the score " * 2
    texts = ["Dull.", long, "Great.", long + "again", "Awful", "Fine film.", long + "!", "Superb."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert len(length_groups(enc["attention_mask"].sum(dim=1))) > 1
    grouped = reward.grouped_rewards(model, enc, "fp32")
    grouped.sum().backward()
    g_grouped = _grads(model)
    model.zero_grad(set_to_none=True)
    whole = model(**enc).logits[:, 0]
    whole.sum().backward()
    torch.testing.assert_close(grouped.double(), whole.float().double(), rtol=0, atol=1e-6)
    assert_close(g_grouped, _grads(model))
