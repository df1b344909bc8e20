"""Evaluation stage end to end on a tiny causal LM, a tiny reward model and VADER."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fdpipe.common import tables
from fdpipe.stages import evaluate
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import read_metadata, read_parquet, write_parquet

WORDS = ["<eos>", "<unk>", "the", "movie", "is", "great", "bad", "fun", "boring", "a", "film", "and", "."]
CFG = {"samples_per_prompt": 3, "max_new_tokens": 5, "batch_prompts": 2, "bootstrap_resamples": 200}


def _tokenizer():
    # A word-level tokenizer (rather than tiny_assets' byte-level BPE) so that a decoded
    # sample re-encodes to exactly the sampled ids: the float64 check below relies on it.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # "<unk>" is an ordinary word here, so that decoded samples re-encode to the same ids.
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>",
                                   padding_side="left")


def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       eos_token_id=0, pad_token_id=0, bos_token_id=None, **extra)


def _save_lm(path, seed, noise=0.0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config())
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("eval_assets")
    _save_lm(root / "sft", seed=0)
    _save_lm(root / "same", seed=0)                # identical to the SFT model
    _save_lm(root / "aligned", seed=0, noise=0.3)  # a different policy
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(_llama_config(num_labels=1))
    rm.save_pretrained(root / "reward")
    _tokenizer().save_pretrained(root / "reward")
    (root / "reward" / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0, "max_length": 32}))
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(5)],
                            "prompt": ["the movie is", "a film", "the film is", "fun and", "a movie"],
                            "text": ["x"] * 5, "rating": [1.0] * 5})
    write_parquet(prompts, root / "prompts_eval.parquet")
    (root / "target.json").write_text(json.dumps({"kind": "rlhf", "beta": 0.5, "threshold": 0.0, "epsilon": 1e-3,
                                                  "feature": "indicator", "moment": 0.5, "lambda": None,
                                                  "reward_normalized": True}))
    return root


def _run(assets, out, policy="sft", model=None, **kw):
    return evaluate.run(policy, assets / (model or policy), assets / "sft", assets / "reward",
                        assets / "prompts_eval.parquet", out / "samples.parquet", out / "summary.parquet",
                        CFG, seed=7, device="cpu", **kw)


@pytest.fixture(scope="module")
def sft_eval(assets):
    out = assets / "eval" / "sft"
    summary = _run(assets, out)
    return out, summary


def test_sft_samples_schema_and_values(assets, sft_eval):
    out, summary = sft_eval
    samples = read_parquet(out / "samples.parquet")
    assert list(samples.columns) == list(tables.SAMPLE_COLUMNS)
    assert len(samples) == 5 * 3
    assert samples.groupby("prompt_id")["sample"].apply(lambda s: sorted(s) == [0, 1, 2]).all()
    assert (samples["policy"] == "sft").all()
    assert np.array_equal(samples["logp_policy"], samples["logp_sft"])
    assert samples["length"].between(1, 5).all()
    assert (samples["logp_policy"] < 0).all() and (samples["entropy"] > 0).all()
    assert np.allclose(samples["reward"], (samples["reward_raw"] - 0.5) / 2.0)
    assert samples["gold"].between(-1, 1).all()
    assert all(t.startswith(p) for t, p in zip(samples["text"], samples["prompt"]))
    meta = read_metadata(out / "samples.parquet")
    assert meta["stage"] == "evaluate" and meta["config_hash"] and meta["seed"] == 7


def test_sft_summary(sft_eval):
    out, summary = sft_eval
    on_disk = read_parquet(out / "summary.parquet")
    assert list(on_disk.columns) == list(tables.SUMMARY_COLUMNS)
    assert (on_disk["policy"] == "sft").all() and (on_disk["run"] == "sft").all()
    assert on_disk["divergence"].isna().all()
    metrics = on_disk.set_index("metric")
    assert set(metrics.index) == {"reward_mean", "gold_mean", "kl_pi_sft", "entropy_per_token",
                                  "completion_length", "distinct_1", "distinct_2", "distinct_3", "self_bleu"}
    assert metrics.loc["kl_pi_sft", ["value", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    samples = read_parquet(out / "samples.parquet")
    assert metrics.loc["reward_mean", "value"] == pytest.approx(samples["reward"].mean())
    r = metrics.loc["reward_mean"]
    assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["ci_low"] < r["ci_high"]
    tokens_entropy = samples["entropy"].sum() / samples["length"].sum()
    assert metrics.loc["entropy_per_token", "value"] == pytest.approx(tokens_entropy)
    assert (on_disk["n"] == 15).all()
    assert math.isnan(metrics.loc["self_bleu", "ci_low"])
    assert read_metadata(out / "summary.parquet")["config_hash"]


def test_logprobs_match_a_float64_forward(assets, sft_eval):
    """Re-encode each sample without padding and score it in float64: same log-probability."""
    from transformers import LlamaForCausalLM

    out, _ = sft_eval
    samples = read_parquet(out / "samples.parquet")
    model = LlamaForCausalLM.from_pretrained(assets / "sft").double().eval()
    tok = _tokenizer()
    for row in samples.itertuples():
        prompt = tok(row.prompt, add_special_tokens=False)["input_ids"]
        completion = tok(row.completion, add_special_tokens=False)["input_ids"] if row.completion else []
        if len(completion) < row.length:
            completion = completion + [0]           # the EOS that ended the sample
        assert len(completion) == row.length
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        expected = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum()
        assert row.logp_policy == pytest.approx(float(expected), abs=1e-4)


def test_sampling_is_seeded(assets, sft_eval, tmp_path):
    out, _ = sft_eval
    _run(assets, tmp_path)
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "samples.parquet"), read_parquet(out / "samples.parquet"))


def test_micro_batches_give_the_same_samples_and_bf16_evaluates(assets, sft_eval, tmp_path):
    """evaluation.micro_batch_size: the same samples (log-probabilities to float32 rounding);
    evaluation.precision: bf16 evaluates with float32 log-probabilities close to fp32's."""
    out, _ = sft_eval
    whole = read_parquet(out / "samples.parquet")
    for name, extra in (("micro", {"micro_batch_size": 3}), ("bf16", {"precision": "bf16"})):
        evaluate.run("sft", None, assets / "sft", assets / "reward", assets / "prompts_eval.parquet",
                     tmp_path / name / "samples.parquet", tmp_path / name / "summary.parquet", {**CFG, **extra},
                     seed=7, device="cpu")
    micro = read_parquet(tmp_path / "micro" / "samples.parquet")
    exact = ["prompt_id", "sample", "completion", "text", "length"]
    pd.testing.assert_frame_equal(micro[exact], whole[exact])
    for column in ("logp_policy", "logp_sft", "entropy", "reward"):
        np.testing.assert_allclose(micro[column], whole[column], rtol=0, atol=1e-5)
    bf16 = read_parquet(tmp_path / "bf16" / "samples.parquet")
    assert bf16["logp_policy"].dtype == np.float64 and np.isfinite(bf16["logp_policy"]).all()


def _aligned(assets, sft_eval, out, model):
    sft_out, _ = sft_eval
    return _run(assets, out, policy="run1", model=model, divergence="js", target_path=assets / "target.json",
                sft_samples_path=sft_out / "samples.parquet")


def test_aligned_policy_summary(assets, sft_eval, tmp_path):
    summary = _aligned(assets, sft_eval, tmp_path, "aligned")
    samples = read_parquet(tmp_path / "samples.parquet")
    assert (samples["policy"] == "run1").all()
    mine = summary[summary["policy"] == "run1"].set_index("metric")
    assert (summary["run"] == "run1").all()
    assert (summary["divergence"] == "js").all() and (summary["target"] == "rlhf(beta=0.5)").all()
    kl = (samples["logp_policy"] - samples["logp_sft"]).mean()
    assert mine.loc["kl_pi_sft", "value"] == pytest.approx(kl) and kl != 0
    for metric in ("kl_pi_p", "kl_p_pi", "js", "tv", "chi2", "rchi2", "objective", "log_z", "constraint"):
        assert metric in mine.index
        assert metric in set(summary[summary["policy"] == "sft"]["metric"])
    assert mine.loc["objective", "value"] == mine.loc["js", "value"]
    assert 0 <= mine.loc["tv", "value"] <= 1
    assert mine.loc["constraint", "value"] == pytest.approx(samples["reward"].mean())   # rlhf: E_π[r]
    row = mine.loc["kl_pi_p"]
    assert row["ci_low"] < row["value"] < row["ci_high"]


def test_policy_equal_to_sft_has_the_sfts_divergences(assets, sft_eval, tmp_path):
    summary = _aligned(assets, sft_eval, tmp_path, "same")
    by = summary.pivot_table(index="metric", columns="policy", values="value")
    for metric in ("kl_pi_p", "kl_p_pi", "js", "tv", "chi2", "rchi2", "log_z", "constraint"):
        assert by.loc[metric, "run1"] == pytest.approx(by.loc[metric, "sft"], rel=1e-6, abs=1e-9)
    assert by.loc["kl_pi_sft", "run1"] == 0.0


def test_raw_reward_targets(assets, sft_eval, tmp_path):
    spec = json.loads((assets / "target.json").read_text())
    spec.update(kind="pointwise", threshold=0.2, reward_normalized=False)
    (tmp_path / "target.json").write_text(json.dumps(spec))
    sft_out, _ = sft_eval
    summary = evaluate.run("run1", assets / "aligned", assets / "sft", assets / "reward",
                           assets / "prompts_eval.parquet", tmp_path / "s.parquet", tmp_path / "m.parquet", CFG,
                           seed=7, device="cpu", divergence="fkl", target_path=tmp_path / "target.json",
                           sft_samples_path=sft_out / "samples.parquet")
    samples = read_parquet(tmp_path / "s.parquet")
    constraint = summary[(summary["policy"] == "run1") & (summary["metric"] == "constraint")]["value"].item()
    assert constraint == pytest.approx((samples["reward_raw"] >= 0.2).mean())


def test_missing_and_bad_inputs(assets, sft_eval, tmp_path):
    sft_out, _ = sft_eval
    with pytest.raises(DataError, match="nowhere.parquet"):
        evaluate.run("sft", None, assets / "sft", assets / "reward", tmp_path / "nowhere.parquet",
                     tmp_path / "a.parquet", tmp_path / "b.parquet", CFG, seed=0, device="cpu")
    with pytest.raises(DataError, match="target.json: file not found"):
        _run(assets, tmp_path, policy="run1", model="aligned", divergence="js", target_path=tmp_path / "target.json",
             sft_samples_path=sft_out / "samples.parquet")
    with pytest.raises(DataError, match="missing.parquet"):
        _run(assets, tmp_path, policy="run1", model="aligned", divergence="js", target_path=assets / "target.json",
             sft_samples_path=tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="nothing: .*folder not found"):
        _run(assets, tmp_path, policy="run1", model="nothing", divergence="js", target_path=assets / "target.json",
             sft_samples_path=sft_out / "samples.parquet")
    with pytest.raises(ConfigError, match="evaluation.temperature"):
        evaluate.EvalConfig.from_dict({"temperature": 0.7})
    with pytest.raises(ConfigError, match="evaluation.samples_per_prompt"):
        evaluate.EvalConfig.from_dict({"samples_per_prompt": 0})
    bad = tmp_path / "distributional.json"
    bad.write_text(json.dumps({"kind": "distributional", "lambda": None}))
    with pytest.raises(DataError, match="lambda"):
        evaluate.read_target(bad)
    write_parquet(pd.DataFrame({"prompt": ["a"]}), tmp_path / "noid.parquet")
    with pytest.raises(DataError, match="prompt_id"):
        evaluate.read_prompts(tmp_path / "noid.parquet")
    assert not (tmp_path / "samples.parquet").exists()


def test_config_defaults_match_the_schema():
    import dataclasses

    from fdpipe.common.config import validate_config
    from fdpipe.stages.report import ReportConfig

    from pathlib import Path

    config = validate_config({}, Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    assert dataclasses.asdict(evaluate.EvalConfig.from_dict(config["evaluation"])) == dataclasses.asdict(
        evaluate.EvalConfig())
    assert ReportConfig.from_dict(config["report"]) == ReportConfig()
