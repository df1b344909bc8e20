"""Targets over features through the alignment, evaluation and report stages on tiny models:
a Hugging Face classifier and a thresholded user's callable (imported from the working
directory) as pointwise conditions, a regex and the callable's raw value as requested moments."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import tiny_assets
from fdpipe.common.io import read_metadata, read_parquet
from fdpipe.models.reward_model import resolve_backbone
from fdpipe.stages import align, data, evaluate, report

DATA_CFG = {"source": "x.csv", "text_column": "text", "rating_column": "rating", "val_fraction": 0.1,
            "eval_fraction": 0.1, "prompt_words": 3, "pair_margin": 1.5, "pairs_train": 32, "pairs_val": 8,
            "max_prompts_train": 8, "max_prompts_eval": 4}
FEATURES = {
    "positive": {"kind": "classifier", "model": "clf", "label": "POSITIVE", "threshold": 0.5},
    "wordy": {"kind": "callable", "function": "gdc_stage_features:n_chars", "threshold": 8.0},
    "has_e": {"kind": "regex", "pattern": "e"},
    "chars": {"kind": "callable", "function": "gdc_stage_features:n_chars"},
}
TARGET = {"kind": "distributional", "features": {"positive": {"epsilon": 0.1}, "wordy": {"epsilon": 0.2},
                                                 "has_e": {"moment": 0.5}, "chars": {"moment": 10.0}}}
RUN_CFG = {"divergence": "fkl", "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 4, "lr": 1e-3,
           "train_layers": -1, "max_new_tokens": 6, "checkpoint_every": 1, "fit_samples": 32,
           "target": TARGET, "features": FEATURES}
EVAL_CFG = {"samples_per_prompt": 4, "max_new_tokens": 6, "bootstrap_resamples": 50}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with data, a tiny LM, a tiny reward model, a classifier and a
    features module; each test runs from it, as a Snakemake job does."""
    root = tmp_path_factory.mktemp("gdc_stages")
    csv = tiny_assets.write_ratings_csv(root / "ratings.csv", n=200)
    data.run({**DATA_CFG, "source": str(csv)}, 0, csv, {n: root / "data" / f"{n}.parquet" for n in data.OUTPUTS})
    tiny_assets.build_tiny_lm(root / "lm")
    tiny_assets.build_tiny_classifier(root / "clf")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("embedded"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=1)).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    (root / "gdc_stage_features.py").write_text("def n_chars(texts):\n    return [len(t) for t in texts]\n")
    return root


@pytest.fixture(scope="module")
def aligned(work):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        frame = align.run(sft_model=work / "lm", reward_model=work / "reward",
                          prompts_path=work / "data" / "prompts_train.parquet", run_name="gdc", run_cfg=RUN_CFG,
                          seed=0, out_model=work / "gdc" / "model", out_metrics=work / "gdc" / "metrics.parquet",
                          out_target=work / "gdc" / "target.json", state_path=work / "gdc" / "state.pt",
                          device="cpu", threads=1)
        for policy, extra in (("sft", {}), ("gdc", {"divergence": "fkl", "target_path": work / "gdc" / "target.json",
                                                    "sft_samples_path": work / "eval" / "sft" / "samples.parquet"})):
            evaluate.run(policy, work / "gdc" / "model", work / "lm", work / "reward",
                         work / "data" / "prompts_eval.parquet", work / "eval" / policy / "samples.parquet",
                         work / "eval" / policy / "summary.parquet", EVAL_CFG, seed=0, device="cpu", **extra)
    return frame


def test_align_logs_every_feature_and_writes_the_target(work, aligned):
    metrics = read_parquet(work / "gdc" / "metrics.parquet")
    new = [c for c in metrics.columns if c.startswith(("feature_", "lambda_"))]
    assert new == ["feature_positive", "feature_wordy", "feature_has_e", "feature_chars", "lambda_has_e",
                   "lambda_chars"]
    assert list(metrics.columns).index("feature_positive") == list(metrics.columns).index("lambda") + 1
    assert metrics["feature_has_e"].between(0, 1).all() and metrics["lambda"].isna().all()
    spec = json.loads((work / "gdc" / "target.json").read_text())
    assert spec["features"] == TARGET["features"] and len(spec["lambda"]) == 2
    assert spec["feature_definitions"]["wordy"] == {**FEATURES["wordy"], "scope": "completion", "batch_size": 32}
    assert spec["lambda_fit"]["moments"] == pytest.approx({"has_e": 0.5, "chars": 10.0}, abs=1e-4)
    assert list(metrics["lambda_has_e"]) == [spec["lambda"][0]] * 2


def test_evaluation_reports_each_feature_per_policy_with_the_requested_moment(work, aligned):
    samples = read_parquet(work / "eval" / "gdc" / "samples.parquet")
    assert [c for c in samples.columns if c.startswith("feature_")] == [
        "feature_positive", "feature_wordy", "feature_has_e", "feature_chars"]
    assert (samples["feature_wordy"] == (samples["completion"].str.len() >= 8)).all()
    assert (samples["feature_has_e"] == samples["completion"].str.contains("e")).all()
    assert (samples["feature_chars"] == samples["completion"].str.len()).all()
    assert "feature_wordy" in read_metadata(work / "eval" / "gdc" / "samples.parquet")["columns"]
    summary = read_parquet(work / "eval" / "gdc" / "summary.parquet")
    rows = summary[summary["metric"].str.startswith("feature_")].set_index(["policy", "metric"])
    assert len(rows) == 8 and set(rows.index.get_level_values("policy")) == {"sft", "gdc"}
    mine = rows.loc["gdc"]
    assert mine.loc["feature_has_e", "value"] == pytest.approx(samples["feature_has_e"].mean())
    assert mine.loc["feature_has_e", "ci_low"] <= mine.loc["feature_has_e", "value"] <= mine.loc["feature_has_e",
                                                                                                  "ci_high"]
    assert mine["requested"].to_dict() == pytest.approx(
        {"feature_positive": math.nan, "feature_wordy": math.nan, "feature_has_e": 0.5, "feature_chars": 10.0},
        nan_ok=True)
    sft = read_parquet(work / "eval" / "sft" / "samples.parquet")
    assert rows.loc[("sft", "feature_has_e"), "value"] == pytest.approx(sft["completion"].str.contains("e").mean())
    assert "constraint" not in set(summary["metric"])          # distributional over features: per feature only
    assert {"kl_pi_p", "kl_p_pi", "objective"} <= set(summary["metric"])
    assert "requested" in read_metadata(work / "eval" / "gdc" / "summary.parquet")["columns"]


def test_report_keeps_the_requested_column_and_draws_the_features(work, aligned, tmp_path):
    out = [tmp_path / n for n in ("summary.parquet", "curves.parquet", "frontier.png", "frontier.svg", "curves.png",
                                  "curves.svg")]
    summary, curves = report.run([work / "eval" / p / "summary.parquet" for p in ("sft", "gdc")],
                                 [work / "gdc" / "metrics.parquet"], *out, features_png=tmp_path / "features.png",
                                 features_svg=tmp_path / "features.svg")
    assert list(summary.columns)[-1] == "requested"
    assert summary.loc[summary["metric"] == "reward_mean", "requested"].isna().all()
    assert set(curves["metric"]) >= {"feature_has_e", "lambda_chars"}
    assert (tmp_path / "features.png").stat().st_size > 5000
    assert pd.read_parquet(out[0])["requested"].notna().sum() == 4      # has_e and chars, for sft and gdc
