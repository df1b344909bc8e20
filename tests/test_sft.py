"""SFT on a tiny model: completion-only loss, padding, training, saving, resuming."""
import pytest
import torch
import torch.nn.functional as F

from fdpipe.stages import data, sft
from fdpipe.training import checkpoint
from fdpipe.training.guards import NonFiniteError

from fdpipe.models import causal_lm
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import read_metadata

import tiny_assets

CFG = {"steps": 40, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.01, "warmup_steps": 4,
       "max_length": 24, "train_layers": -1, "eval_every": 20, "eval_batches": 2,
       "grad_clip": 1.0, "checkpoint_every": 10}
DATA_CFG = {"source": "x.csv", "text_column": "text", "rating_column": "rating",
            "val_fraction": 0.1, "eval_fraction": 0.1, "prompt_words": 3, "pair_margin": 1.5,
            "pairs_train": 10, "pairs_val": 5, "max_prompts_train": 10, "max_prompts_eval": 5}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    csv = tiny_assets.write_ratings_csv(root / "ratings.csv", n=300)
    outs = {name: root / "data" / f"{name}.parquet" for name in data.OUTPUTS}
    data.run({**DATA_CFG, "source": str(csv)}, 0, csv, outs)
    model = tiny_assets.build_tiny_lm(root / "tiny")
    return {"model": model, "train": outs["sft_train"], "val": outs["sft_val"], "root": root}


@pytest.fixture(scope="module")
def tok(assets):
    return causal_lm.load_tokenizer(assets["model"])


def test_encode_appends_eos_and_truncates(tok):
    ex = sft.encode_examples(tok, ["The movie is"], [" good and fine."], 64)
    ids, n_prompt = ex[0]
    assert ids[:n_prompt] == tok("The movie is")["input_ids"]
    assert ids[n_prompt:-1] == tok(" good and fine.", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "The movie is good and fine."
    short = sft.encode_examples(tok, ["The movie is"], [" good and fine."], n_prompt + 2)[0]
    assert short[1] == n_prompt and short[0] == ids[:n_prompt + 2]  # cut, so no EOS


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_labels_only_completion_tokens(tok, side):
    ex = sft.encode_examples(tok, ["The movie", "The plot is"], [" is dull.", " wonderful and moving."], 64)
    batch = sft.collate(ex, tok.pad_token_id, side)
    for row, (ids, n_prompt) in enumerate(ex):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == ids
        labels = batch["labels"][row][real].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        assert (batch["labels"][row][~real] == -100).all()
        assert batch["position_ids"][row][real].tolist() == list(range(len(ids)))


def test_loss_is_completion_cross_entropy(assets, tok):
    model = causal_lm.load_causal_lm(assets["model"])
    ex = sft.encode_examples(tok, ["The movie", "The plot is"], [" is dull.", " wonderful and moving."], 64)
    batch = sft.collate(ex, tok.pad_token_id, "right")
    logp = sft.token_logprobs(model, batch)
    completion = batch["labels"][:, 1:] != -100
    assert (logp[~completion] == 0).all() and (logp[completion] < 0).all()
    with torch.no_grad():
        loss, n = sft.completion_loss(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]),
                          batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert n == int(completion.sum())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    # with prompt tokens counted the loss would differ
    every = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)[:, 1:]
    full = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]),
                           every.reshape(-1), ignore_index=-100)
    assert abs(float(full) - loss.item()) > 1e-4


def test_left_and_right_padding_give_the_same_loss(assets, tok):
    model = causal_lm.load_causal_lm(assets["model"])
    ex = sft.encode_examples(tok, ["The movie", "The plot is"], [" is dull.", " wonderful and moving."], 64)
    right, _ = sft.completion_loss(model, sft.collate(ex, tok.pad_token_id, "right"))
    left, _ = sft.completion_loss(model, sft.collate(ex, tok.pad_token_id, "left"))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-6)


def run_sft(assets, out, cfg=CFG, seed=0):
    out.mkdir(parents=True, exist_ok=True)
    return sft.run(model_path=assets["model"], train_path=assets["train"], val_path=assets["val"], cfg=cfg,
                   seed=seed, out_dir=out / "model", metrics_path=out / "metrics.parquet",
                   state_path=out / "state.pt", device="cpu", threads=1)


@pytest.fixture(scope="module")
def trained(assets):
    out = assets["root"] / "run"
    return out, run_sft(assets, out)


def test_training_lowers_val_loss_and_saves(trained, assets):
    from transformers import AutoModelForCausalLM

    out, metrics = trained
    assert list(metrics.columns) == ["step", "split", "metric", "value"]
    val = metrics[(metrics.split == "val") & (metrics.metric == "loss")].set_index("step")["value"]
    assert list(val.index) == [0, 20, 40]
    assert val[40] < 0.7 * val[0]
    train = metrics[metrics.split == "train"]
    assert set(train.metric) == {"loss", "perplexity", "tokens_per_s", "seconds", "lr", "grad_norm"}
    assert sorted(set(train.step)) == list(range(1, 41))
    assert read_metadata(out / "metrics.parquet")["config"] == CFG
    assert not (out / "state.pt").exists()  # removed once the stage finished
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    assert not torch.equal(reloaded.model.layers[0].mlp.up_proj.weight,
                           base.model.layers[0].mlp.up_proj.weight)
    assert causal_lm.load_tokenizer(out / "model").pad_token == "<|im_end|>"


def test_frozen_layers_stay_unchanged(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    run_sft(assets, tmp_path, {**CFG, "steps": 3, "train_layers": 1, "eval_every": 3})
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(assets["model"]).state_dict()
    for name, value in base.items():
        changed = not torch.equal(value, tuned[name])
        assert changed == name.startswith(("model.layers.1.", "model.norm.")), name


def test_killed_run_resumes_to_the_same_result(trained, assets, tmp_path, monkeypatch):
    out, straight = trained
    real, calls = sft.completion_loss, []

    def dies_at_step_13(model, batch, *precision):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 13:
                raise KeyboardInterrupt
        return real(model, batch, *precision)

    monkeypatch.setattr(sft, "completion_loss", dies_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        run_sft(assets, tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 10 and not (tmp_path / "model").exists()
    monkeypatch.setattr(sft, "completion_loss", real)
    resumed = run_sft(assets, tmp_path)
    a = causal_lm.load_causal_lm(out / "model").state_dict()
    b = causal_lm.load_causal_lm(tmp_path / "model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    keep = ~straight.metric.isin(["tokens_per_s", "seconds"])
    assert resumed[keep].reset_index(drop=True).equals(straight[keep].reset_index(drop=True))


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_state(assets, tmp_path, monkeypatch):
    real, calls = sft.completion_loss, []

    def nan_at_step_13(model, batch, *precision):
        loss, n = real(model, batch, *precision)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 13:
                loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(sft, "completion_loss", nan_at_step_13)
    with pytest.raises(NonFiniteError, match=r"step 13: non-finite loss \(nan\); the last good state is kept in .*state.pt"):
        run_sft(assets, tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 10 and not (tmp_path / "model").exists()
    assert all(torch.isfinite(v).all() for v in state["trained"].values())


def test_state_of_another_config_stops_with_the_path(assets, tmp_path):
    cfg = {**CFG, "steps": 2, "eval_every": 2, "checkpoint_every": 1}
    run_sft(assets, tmp_path, cfg)   # leaves no state behind; write one of a longer run
    checkpoint.save_state(tmp_path / "state.pt", "another run", step=1, trained={}, metrics=[])
    with pytest.raises(DataError, match=r"state.pt: training state of another run .*delete it"):
        run_sft(assets, tmp_path, cfg)


@pytest.mark.parametrize("key,value", [("steps", 0), ("lr", 0), ("train_layers", -2),
                                       ("batch_size", 1.5), ("grad_clip", -1)])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"sft.{key}"):
        sft.check_config({**CFG, key: value})
