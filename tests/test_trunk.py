"""The shared frozen trunk (fdpipe.models.trunk) against the full forward.

Tolerances, per sequence log-probability: float64 models 1e-6 (the kernels return float32
log-probabilities, so this is float32 rounding of equal float64 values); float32 models 2e-5
(float32 noise of a 4-block model). Gradients of the float64 models (float64 throughout):
1e-10. The sampling-vs-training gap (sampling accumulates float32): 2e-5.
"""
import copy

import pytest
import torch

from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.trainable import set_trainable
from fdpipe.models.trunk import TrunkSplit

EOS, PAD = 1, 1
PROMPTS = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]


def tiny_llama(dtype, attn="sdpa", layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pair(dtype, k=2, attn="sdpa"):
    base = tiny_llama(dtype, attn)
    policy_model = copy.deepcopy(base)
    set_trainable(policy_model, k, key="train_layers")
    trunk = TrunkSplit.of(base, k)
    assert trunk is not None and trunk.shares_trunk_with(policy_model) and trunk.trunk_frozen(policy_model)
    make = lambda m, t: CausalPolicy(m, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6, trunk=t)
    return make(policy_model, trunk), make(base, trunk), make(copy.deepcopy(policy_model), None)


def strip(samples):
    clone = copy.copy(samples)
    clone.extra = {}
    return clone


# (eager attention in float64 gives NaN on left-padded rows in transformers itself, sampling included)
@pytest.mark.parametrize("attn,dtype,tol", [("sdpa", torch.float64, 1e-6), ("sdpa", torch.float32, 2e-5),
                                            ("eager", torch.float32, 2e-5)])
def test_shared_trunk_logprobs_equal_full_forward(attn, dtype, tol):
    policy, base, full = pair(dtype, attn=attn)
    gen = torch.Generator().manual_seed(0)
    samples = policy.sample(PROMPTS, 3, generator=gen, capture_trunk=True)
    assert samples.extra["trunk"] is policy.trunk
    assert (~samples.completion_mask[:, -1]).any(), "some completion should end early (EOS)"
    assert samples.attention_mask.eq(0).any(), "left padding is exercised"
    for model in (policy, base):
        shared = model.score(samples, with_entropy=True)
        reference = full.score(strip(samples), with_entropy=True) if model is policy else \
            CausalPolicy(base.model, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6).score(
                strip(samples), with_entropy=True)
        assert torch.allclose(shared.logprobs.double(), reference.logprobs.double(), atol=tol, rtol=0)
        assert torch.allclose(shared.entropy.double(), reference.entropy.double(), atol=tol * 10, rtol=0)
    # the trunk computed once (no recording) gives the same as the recorded one
    computed = policy.attach_trunk(strip(samples))
    assert torch.allclose(policy.score(computed).logprobs.double(), policy.score(samples).logprobs.double(),
                          atol=tol, rtol=0)
    # the sampling-vs-training gap stays at float noise
    gap = (samples.sample_logprobs.double() - policy.score(samples).logprobs.double()).abs().max()
    assert gap < 2e-5


def test_shared_trunk_gradients_equal_full_forward():
    policy, _, full = pair(torch.float64)
    samples = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(1), capture_trunk=True)
    weights = torch.linspace(-1, 1, len(samples), dtype=torch.float64)
    for model, batch in ((policy, samples), (full, strip(samples))):
        (model.score(batch).logprobs * weights).sum().backward()
    grads = [(a.grad, b.grad) for a, b in zip(policy.model.parameters(), full.model.parameters()) if a.requires_grad]
    assert grads and all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in grads)


def test_shared_prefill_draws_the_same_samples():
    """One prefill per prompt (cache repeated) draws what a prefill of every row draws."""
    policy, _, _ = pair(torch.float64)
    shared = policy.sample(PROMPTS, 3, generator=torch.Generator().manual_seed(2))
    rows = [p for p in PROMPTS for _ in range(3)]
    each = policy.sample(rows, 1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(shared.input_ids, each.input_ids)
    assert torch.equal(shared.completion_mask, each.completion_mask)
    assert torch.allclose(shared.sample_logprobs, each.sample_logprobs, atol=1e-6, rtol=0)


def test_split_falls_back():
    model = tiny_llama(torch.float32)
    assert TrunkSplit.of(model, -1) is None          # everything trains: nothing to share
    assert TrunkSplit.of(model, 5) is None           # more blocks than the model has
    assert TrunkSplit.of(torch.nn.Linear(2, 2), 1) is None   # not Llama-style
    other = tiny_llama(torch.float32, seed=1)
    assert not TrunkSplit.of(model, 2).shares_trunk_with(other)


def _aligner(policy, base, proposal):
    reward_fn = lambda s: s.input_ids[:, -1].double() / 16.0
    cfg = AlignConfig(steps=2, prompts_per_step=2, samples_per_prompt=2, lr=1e-3, proposal=proposal, token_kl=True)
    prompts = PromptCycle(list(range(len(PROMPTS))), PROMPTS, seed=0)
    return Aligner(policy, base, reward_fn, Target.from_config({"kind": "rlhf", "beta": 1.0}, key="t"), prompts,
                   cfg, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("proposal", ["online", "offline"])
def test_aligner_uses_the_trunk_online_only(proposal):
    policy, base, _ = pair(torch.float32)
    aligner = _aligner(policy, base, proposal)
    assert aligner.share_trunk == (proposal == "online")
    metrics = aligner.step()
    assert torch.isfinite(torch.tensor(metrics["objective"]))
    if proposal == "online":
        assert metrics["logprob_gap"] < 2e-5
    else:
        assert aligner.proposal.trunk is None


def test_aligner_step_equals_full_forward_step():
    """One online step with the shared trunk and one with full forwards: same metrics, same update."""
    results = []
    for shared in (True, False):
        policy, base, _ = pair(torch.float64)
        if not shared:
            policy.trunk = base.trunk = None
        aligner = _aligner(policy, base, "online")
        assert aligner.share_trunk == shared
        results.append((aligner.step(), [p.detach().clone() for p in policy.trainable_parameters()]))
    (m1, p1), (m2, p2) = results
    for key in ("objective", "kl_pi_a", "kl_pi_a_tokens", "entropy_per_token", "logprob_gap", "grad_norm"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-8, abs=1e-10), key
    assert all(torch.allclose(a, b, atol=1e-10, rtol=0) for a, b in zip(p1, p2))


def test_common_trunk_is_the_longest_equal_prefix():
    base = tiny_llama(torch.float64)
    assert TrunkSplit.common(base, base).head_layers == 0
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.layers[2].mlp.up_proj.weight.add_(1e-3)
    split = TrunkSplit.common(other, base)
    assert split.boundary == 2 and split.shares_trunk_with(base)
    policy = CausalPolicy(other, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6, trunk=split)
    ref = CausalPolicy(base, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6, trunk=split)
    samples = policy.sample(PROMPTS, 2, generator=torch.Generator().manual_seed(3), capture_trunk=True)
    for model in (policy, ref):
        full = CausalPolicy(model.model, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=6)
        assert torch.allclose(model.score(samples, with_entropy=True).logprobs,
                              full.score(strip(samples), with_entropy=True).logprobs, atol=1e-6, rtol=0)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1e-3)
    assert TrunkSplit.common(other, base) is None


def test_align_stage_with_the_shared_trunk_equals_full_forwards(tmp_path, monkeypatch):
    """The align stage with train_layers 1 of 3: shared trunk and full forwards give the same run
    (float32 noise), and the trained model shares its first 2 blocks with the SFT model."""
    import pandas as pd
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    import tiny_assets
    from fdpipe.common.io import read_parquet, write_parquet
    from fdpipe.models.causal_lm import load_causal_lm
    from fdpipe.stages import align

    tiny_assets.build_tiny_lm(tmp_path / "lm", layers=3)
    config = LlamaConfig.from_pretrained(tmp_path / "lm")
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "reward")
    AutoTokenizer.from_pretrained(tmp_path / "lm").save_pretrained(tmp_path / "reward")
    write_parquet(pd.DataFrame({"prompt_id": list("abcd"), "prompt": ["the movie is", "a film", "the plot", "it"]}),
                  tmp_path / "prompts.parquet")
    run_cfg = {"divergence": "rkl", "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 3, "lr": 1e-2,
               "train_layers": 1, "max_new_tokens": 5, "token_kl": True, "target": {"kind": "rlhf", "beta": 0.5}}
    frames, heads = {}, []
    original_head = TrunkSplit.head
    monkeypatch.setattr(TrunkSplit, "head", lambda self, *a, **k: heads.append(1) or original_head(self, *a, **k))
    for way in ("shared", "full"):
        if way == "full":
            assert len(heads) == 2 * 2   # base and policy heads, each step of the shared run
            monkeypatch.setattr(align.TrunkSplit, "of", classmethod(lambda cls, model, k: None))
        out = tmp_path / way
        frames[way] = align.run(sft_model=tmp_path / "lm", reward_model=tmp_path / "reward",
                                prompts_path=tmp_path / "prompts.parquet", run_name="r", run_cfg=run_cfg, seed=0,
                                out_model=out / "model", out_metrics=out / "metrics.parquet",
                                out_target=out / "target.json", state_path=out / "state.pt", device="cpu", threads=1)
    shared, full = (read_parquet(tmp_path / w / "metrics.parquet") for w in ("shared", "full"))
    for column in ("objective", "log_z", "kl_pi_a", "kl_pi_a_tokens", "reward_mean", "entropy_per_token", "grad_norm"):
        assert shared[column].to_numpy() == pytest.approx(full[column].to_numpy(), rel=1e-4, abs=1e-5), column
    assert (shared["logprob_gap"] < 1e-4).all()
    a, b = (load_causal_lm(tmp_path / w / "model") for w in ("shared", "full"))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.parameters(), b.parameters()))
    split = TrunkSplit.common(a, load_causal_lm(tmp_path / "lm"))
    assert split is not None and split.boundary == 2
