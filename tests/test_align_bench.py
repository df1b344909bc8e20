"""The alignment throughput benchmark (fdpipe.stages.align_bench) on a tiny model."""
import pandas as pd
import pytest
import torch

from fdpipe.common.io import read_metadata, write_parquet
from fdpipe.fdpg import trl_rloo
from fdpipe.stages import align_bench
from tiny_assets import build_tiny_lm

CFG = {"train_layers": 1, "prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "steps": 2,
       "warmup": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("align_bench")
    build_tiny_lm(root / "lm", layers=3)
    tokenizer = AutoTokenizer.from_pretrained(root / "lm")
    config = LlamaConfig.from_pretrained(root / "lm")
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    write_parquet(pd.DataFrame({"prompt": ["the movie is", "a film", "the plot", "this film"]}),
                  root / "prompts.parquet")
    return root


def test_benchmark_writes_rates_and_phases(tiny):
    ways = ["fdpipe", "fdpipe_full", "trl_rloo"]
    table = align_bench.run(model_path=tiny / "lm", reward_path=tiny / "reward", prompts_path=tiny / "prompts.parquet",
                            out_table=tiny / "align.parquet", out_markdown=tiny / "align.md",
                            cfg={**CFG, "ways": ways}, threads=1)
    expected = ways if trl_rloo.version() else ways[:2]
    assert list(dict.fromkeys(table["way"])) == expected
    rates = table[table["metric"] == "samples_per_s"]
    assert (rates["value"] > 0).all() and (rates["steps"] == CFG["steps"]).all()
    phases = table[table["metric"].isin(["sample_s", "score_s", "train_s", "step_s"])]
    assert (phases["value"] >= 0).all()
    meta = read_metadata(tiny / "align.parquet")
    assert meta["stage"] == "align_bench" and "facts" in meta
    page = (tiny / "align.md").read_text()
    assert "fdpipe / fdpipe_full samples/s" in page
    if not trl_rloo.version():
        assert "trl_rloo skipped: trl is not installed" in page


def test_trl_missing_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setattr(trl_rloo, "version", lambda: None)
    times, note = trl_rloo.time_steps("unused", None, [], {}, 0)
    assert times is None and "trl is not installed" in note


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown benchmark settings"):
        align_bench.settings({"stepz": 3})
