"""LoRA (``train.mode: lora``): what trains, one copy of the weights in alignment, saving and resuming."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_assets
from fdpipe.common.errors import ConfigError
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.models import causal_lm, lora
from fdpipe.models.policy import CausalPolicy
from fdpipe.models.trainable import TrainSpec, train_spec
from fdpipe.stages import data, sft
from fdpipe.training import checkpoint

LORA = {"mode": "lora", "rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    return tiny_assets.build_tiny_lm(tmp_path_factory.mktemp("lora") / "lm")


def _load(path):
    return causal_lm.load_causal_lm(path), causal_lm.load_tokenizer(path)


def _storage_bytes(*modules) -> int:
    """Bytes of the distinct tensors behind the parameters of `modules` (shared ones counted once)."""
    seen = {}
    for module in modules:
        for p in module.parameters():
            seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


def test_train_layers_keeps_its_meaning_and_train_decides_when_given():
    assert train_spec({"train_layers": -1}, "sft") == TrainSpec(mode="full", layers=-1)
    assert train_spec({"train_layers": 6, "train": None}, "sft") == TrainSpec(mode="last_layers", layers=6)
    assert train_spec({"train_layers": 6, "train": {"mode": "last_layers"}}, "sft").layers == 6
    assert train_spec({"train_layers": 6, "train": {"mode": "full"}}, "sft").mode == "full"
    spec = train_spec({"train_layers": 6, "train": {**LORA, "target_modules": ["q_proj", "k_proj"]}}, "sft")
    assert (spec.mode, spec.layers, spec.rank, spec.alpha, spec.target_modules) == ("lora", None, 4, 8.0,
                                                                                    ("q_proj", "k_proj"))


@pytest.mark.parametrize("train,key", [
    ({"mode": "adapters"}, "sft.train.mode"), ({"mode": "lora", "rank": 0}, "sft.train.rank"),
    ({"mode": "lora", "dropout": 1.0}, "sft.train.dropout"), ({"mode": "lora", "ranks": 2}, "sft.train.ranks"),
    ({"mode": "lora", "target_modules": []}, "sft.train.target_modules"),
])
def test_a_bad_train_spec_names_its_key(train, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        train_spec({"train_layers": -1, "train": train}, "sft")


def test_target_modules_that_match_nothing_name_the_key(lm_path):
    model, _ = _load(lm_path)
    with pytest.raises(ConfigError, match="config key 'alignment.runs.x.train.target_modules'"):
        lora.policy_and_base(model, train_spec({"train": {**LORA, "target_modules": ["nope"]}}, "x"),
                             key="alignment.runs.x")


@pytest.mark.parametrize("train,adapted", [
    ({"layers": 1}, {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    ({"target_modules": ["o_proj"]}, {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}),
])
def test_layers_and_target_modules_choose_the_adapted_modules(lm_path, train, adapted):
    model, _ = _load(lm_path)
    trainable, _ = lora.policy_and_base(model, train_spec({"train": {**LORA, **train}}, "x"), key="x")
    assert {n.split(".lora_")[0] for n, p in trainable.model.named_parameters() if p.requires_grad} == adapted


def test_alignment_with_lora_holds_one_model_and_its_adapters(lm_path):
    """Today's policy is a deep copy of the base (two models); with LoRA the base is the policy
    with its adapters disabled: the weights are held once, plus the adapters."""
    model, _ = _load(lm_path)
    one_model = _storage_bytes(model)
    full, base = lora.policy_and_base(model, train_spec({"train_layers": 1}, "x"), key="x")
    assert _storage_bytes(full.model, base) == 2 * one_model
    model, _ = _load(lm_path)
    adapted, base = lora.policy_and_base(model, train_spec({"train": LORA}, "x"), key="x")
    adapters = sum(p.numel() * p.element_size() for p in adapted.params)
    assert adapters > 0 and all("lora_" in n for n, p in adapted.model.named_parameters() if p.requires_grad)
    assert _storage_bytes(adapted.model, base) == one_model + adapters


def test_the_base_is_the_model_with_adapters_disabled(lm_path, tmp_path):
    model, tok = _load(lm_path)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapted, base = lora.policy_and_base(model, train_spec({"train": {**LORA, "dropout": 0.5}}, "x"), key="x")
    with torch.no_grad():
        for p in adapted.params:           # adapters that do something (lora_B starts at zero)
            p.add_(0.2 * torch.randn_like(p))
    adapted.model.train()                  # the policy trains (adapter dropout on) ...
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, before)   # ... the base runs without adapters, eval mode
        after = adapted.model.eval()(input_ids=ids).logits
    assert float((after - before).abs().max()) > 1e-3
    assert adapted.model.training is False and base.inner is adapted.model

    adapted.save(tok, tmp_path / "model")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, after, rtol=0, atol=1e-5)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_path),
                                         tmp_path / "model" / lora.ADAPTER_DIR)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, after, rtol=0, atol=1e-5)


def test_an_align_step_with_lora_bf16_and_micro_batches_trains_the_adapters_only(lm_path):
    model, tok = _load(lm_path)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    adapted, frozen = lora.policy_and_base(model, train_spec({"train": LORA}, "x"), key="x")
    cfg = AlignConfig(divergence="rkl", prompts_per_step=2, samples_per_prompt=3, lr=1e-2, precision="bf16",
                      micro_batch_size=4)
    options = {"precision": cfg.precision, "micro_batch_size": cfg.micro_batch_size}
    policy = CausalPolicy.for_tokenizer(adapted.model, tok, max_new_tokens=6, **options)
    base = CausalPolicy.for_tokenizer(frozen, tok, max_new_tokens=6, **options)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("The film", "A", "I")]
    reward = lambda samples: torch.tensor([float(len(t)) for t in samples.completions])
    aligner = Aligner(policy, base, reward, Target(kind="rlhf", beta=1.0), PromptCycle(["a", "b", "c"], prompts, 0),
                      cfg, generator=torch.Generator().manual_seed(0))
    metrics = [aligner.step() for _ in range(2)]
    assert all(0 <= m["logprob_gap"] < 0.05 for m in metrics)     # logged in bf16, at rounding level
    state = aligner.state_dict()
    assert state["policy"] and all(".lora_A." in n or ".lora_B." in n for n in state["policy"])
    assert sum(v.numel() for v in state["policy"].values()) == sum(p.numel() for p in adapted.params)
    with torch.no_grad():                  # the base did not move
        torch.testing.assert_close(frozen(input_ids=torch.tensor([[5, 6, 7]])).logits, reference, rtol=0, atol=0)


SFT_CFG = {"steps": 3, "batch_size": 4, "lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 0, "max_length": 24,
           "train_layers": -1, "eval_every": 3, "eval_batches": 1, "grad_clip": 1.0, "checkpoint_every": 1,
           "micro_batch_size": 3, "train": LORA}


def test_sft_with_lora_saves_merged_weights_and_keeps_only_adapters_in_its_state(lm_path, tmp_path, monkeypatch):
    csv = tiny_assets.write_ratings_csv(tmp_path / "ratings.csv", n=120)
    outs = {name: tmp_path / "data" / f"{name}.parquet" for name in data.OUTPUTS}
    data.run({"source": str(csv), "text_column": "text", "rating_column": "rating", "val_fraction": 0.1,
              "eval_fraction": 0.1, "prompt_words": 3, "pair_margin": 1.5, "pairs_train": 10, "pairs_val": 5,
              "max_prompts_train": 10, "max_prompts_eval": 5}, 0, csv, outs)
    monkeypatch.setattr(checkpoint, "remove_state", lambda path: None)   # keep the last state to read it
    sft.run(model_path=lm_path, train_path=outs["sft_train"], val_path=outs["sft_val"], cfg=SFT_CFG, seed=0,
            out_dir=tmp_path / "model", metrics_path=tmp_path / "metrics.parquet", state_path=tmp_path / "state.pt",
            device="cpu", threads=1)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["trained"] and all(".lora_A." in n or ".lora_B." in n for n in state["trained"])
    before = AutoModelForCausalLM.from_pretrained(lm_path).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)
    assert (tmp_path / "model" / lora.ADAPTER_DIR / "adapter_config.json").is_file()


def test_a_reward_model_with_lora_trains_adapters_and_head_and_saves_merged(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=1))
    trainable = lora.prepare(model, train_spec({"train": LORA}, "reward"), key="reward", train_head=True)
    names = {n for n, p in trainable.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)
    assert all("lora_" in n or "classifier" in n for n in names)
    with torch.no_grad():
        for p in trainable.params:
            p.add_(0.1 * torch.randn_like(p))
        ids = torch.tensor([[1, 5, 7, 9, 2]])
        expected = trainable.model.eval()(input_ids=ids).logits
    trainable.export(tmp_path).save_pretrained(tmp_path)
    assert (tmp_path / lora.ADAPTER_DIR / "adapter_config.json").is_file()
    with torch.no_grad():
        got = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
