"""Reward-model stage: Bradley–Terry math, training, saving/reloading, scoring, resuming, errors."""
import json
import math

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from fdpipe.stages import reward
from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import read_metadata, read_parquet
from fdpipe.common.runtime import seed_everything
from fdpipe.models.reward_model import STATS_FILE, RewardModel, load_backbone, resolve_backbone
from fdpipe.stages.reward import RewardConfig, bt_loss, pair_metrics, rating_metrics
from fdpipe.training import checkpoint

SCHEMA = "workflow/schemas/config.schema.yaml"

# Pairs of review sentences whose sentiment is plain from the words alone; the held-out
# sentences use adjectives never seen in training, so only the backbone's pretrained
# knowledge of sentiment (not memorized words) can rank them.
TEMPLATES = ["The film was {}.", "A {} movie from start to end.", "Honestly, the acting felt {}.",
             "What a {} story.", "The ending is {}.", "I found the script {}."]
POS_TRAIN = ["wonderful", "brilliant", "delightful", "superb", "moving", "charming", "excellent", "lovely"]
NEG_TRAIN = ["awful", "terrible", "boring", "dreadful", "painful", "dull", "horrible", "lousy"]
POS_VAL = ["magnificent", "great", "beautiful", "enjoyable"]
NEG_VAL = ["atrocious", "bad", "ugly", "tedious"]


def _pairs(pos, neg, n, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b, t, u = (torch.randint(k, (1,), generator=gen).item()
                      for k in (len(pos), len(neg), len(TEMPLATES), len(TEMPLATES)))
        rows.append({"pair_id": i, "chosen": TEMPLATES[t].format(pos[a]), "rejected": TEMPLATES[u].format(neg[b]),
                     "chosen_rating": 2.0, "rejected_rating": -2.0, "margin": 4.0})
    return pd.DataFrame(rows).astype({"pair_id": "int64"})


def _ratings(pos, neg):
    texts = [t.format(w) for w in pos + neg for t in TEMPLATES]
    ratings = [2.0] * (len(pos) * len(TEMPLATES)) + [-2.0] * (len(neg) * len(TEMPLATES))
    return pd.DataFrame({"id": range(len(texts)), "text": texts, "rating": ratings,
                         "prompt": [t.split()[0] for t in texts], "completion": [t.split(" ", 1)[1] for t in texts]})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_data")
    paths = {"train": root / "prefs_train.parquet", "val": root / "prefs_val.parquet",
             "ratings": root / "sft_val.parquet"}
    _pairs(POS_TRAIN, NEG_TRAIN, 400, 0).to_parquet(paths["train"], index=False)
    _pairs(POS_VAL, NEG_VAL, 48, 1).to_parquet(paths["val"], index=False)
    _ratings(POS_VAL, NEG_VAL).to_parquet(paths["ratings"], index=False)
    return paths


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A 2-layer BERT with random weights and the embedded MiniLM tokenizer, saved offline."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("embedded"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(backbone, data, out, cfg, seed=0):
    return reward.run(backbone=backbone, prefs_train_path=data["train"], prefs_val_path=data["val"],
                      ratings_path=data["ratings"], cfg=cfg, seed=seed, out_dir=out / "model",
                      metrics_path=out / "metrics.parquet", state_path=out / "state.pt", device="cpu", threads=1)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The embedded MiniLM backbone trained briefly on the template pairs."""
    out = tmp_path_factory.mktemp("reward_out")
    cfg = {"steps": 30, "batch_size": 8, "lr": 2e-4, "warmup_steps": 3, "max_length": 24, "eval_every": 15,
           "train_layers": 2, "checkpoint_every": 1000}
    final = _run("embedded", data, out, cfg)
    return out, final


# ----------------------------------------------------------------------------- math

def test_bt_loss_and_pair_metrics_by_hand():
    r_c = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    r_r = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    s2 = 1 / (1 + math.exp(-2))  # sigmoid(2)
    expected_loss = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bt_loss(r_c, r_r).item() == pytest.approx(expected_loss, rel=1e-12)
    # centering adds coef * mean((r_c + r_r)^2) = 0.1 * (4 + 0 + 0) / 3
    assert bt_loss(r_c, r_r, 0.1).item() == pytest.approx(expected_loss + 0.4 / 3, rel=1e-12)
    m = pair_metrics(r_c, r_r)
    assert m["pair_accuracy"] == pytest.approx(0.5)  # right, tie (1/2), wrong
    assert m["margin_mean"] == pytest.approx(0.0)
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert m["brier"] == pytest.approx(((1 - s2) ** 2 + 0.25 + s2 ** 2) / 3, rel=1e-12)
    # confidences: s2 (bin 7, correct 1 and 0 -> accuracy 1/2), 0.5 (bin 0, accuracy 1/2)
    assert m["ece"] == pytest.approx(2 / 3 * abs(0.5 - s2), rel=1e-12)


def test_pair_metrics_perfect_and_calibrated():
    d = torch.full((1000,), 10.0, dtype=torch.float64)
    m = pair_metrics(d, torch.zeros_like(d))
    assert m["pair_accuracy"] == 1.0 and m["ece"] == pytest.approx(1 - 1 / (1 + math.exp(-10)))


def test_bt_loss_gradient_pushes_chosen_up():
    r_c = torch.zeros(4, requires_grad=True)
    r_r = torch.zeros(4, requires_grad=True)
    bt_loss(r_c, r_r).backward()
    assert torch.allclose(r_c.grad, torch.full((4,), -0.125)) and torch.allclose(r_r.grad, torch.full((4,), 0.125))


def test_rating_metrics():
    ratings = torch.linspace(-3, 3, 50, dtype=torch.float64)
    m = rating_metrics(ratings ** 3, ratings)
    assert m["spearman"] == pytest.approx(1.0) and 0.8 < m["pearson"] < 1.0
    assert rating_metrics(-ratings, ratings)["pearson"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- config

def test_config_defaults_match_schema():
    with open(SCHEMA) as fh:
        props = yaml.safe_load(fh)["properties"]["reward"]["properties"]
    defaults = RewardConfig()
    props.pop("processes")   # how many processes run the job: a stage argument, not a training setting
    assert set(props) == {f for f in RewardConfig.__dataclass_fields__}
    for key, spec in props.items():
        assert spec["default"] == getattr(defaults, key), key
        assert spec.get("description"), key


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'reward.lr'"):
        RewardConfig.from_dict({"lr": -1.0})
    with pytest.raises(ConfigError, match="'reward.stepz'"):
        RewardConfig.from_dict({"stepz": 3})
    assert RewardConfig.from_dict({"epochs": 2, "batch_size": 4}).total_steps(10) == 4


# ----------------------------------------------------------------------------- training

def test_training_beats_chance_and_writes_metrics(trained, data):
    out, final = trained
    seed_everything(0)  # the untrained model that run() starts from
    model, tokenizer = load_backbone("embedded")
    before, _ = reward.heldout_metrics(RewardModel(model, tokenizer, max_length=24), pd.read_parquet(data["val"]),
                                pd.read_parquet(data["ratings"]), 64)
    assert final["pair_accuracy"] >= 0.9 and final["pair_accuracy"] > before["pair_accuracy"] + 0.2
    assert final["spearman"] > 0.5
    metrics = read_parquet(out / "metrics.parquet")
    assert list(metrics.columns) == ["step", "split", "metric", "value"]
    loss = metrics.query("split == 'train' and metric == 'loss'")["value"].to_numpy()
    assert len(loss) == 30 and loss[-5:].mean() < loss[:5].mean()
    val = metrics.query("split == 'val'")
    assert sorted(val["step"].unique()) == [15, 30]
    assert {"pair_accuracy", "margin_mean", "ece", "brier", "pearson", "spearman"} <= set(val["metric"])
    meta = read_metadata(out / "metrics.parquet")
    assert meta["seed"] == 0 and meta["config"]["reward"]["steps"] == 30
    assert not (out / "state.pt").exists()


def test_saved_model_reloads_and_scores_identically(trained, data):
    out, _ = trained
    model_dir = out / "model"
    texts = list(pd.read_parquet(data["ratings"])["text"])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        direct = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits[:, 0] for t in texts])
    scorer = RewardModel.load(model_dir, "cpu")
    scores = scorer.score(texts, batch_size=7)
    assert scores.dtype == torch.float32 and scores.shape == (len(texts),) and not scores.requires_grad
    torch.testing.assert_close(scores, direct, atol=1e-5, rtol=1e-5)

    stats = json.loads((model_dir / STATS_FILE).read_text())
    assert stats["mean"] == pytest.approx(scores.double().mean().item(), abs=1e-5)
    assert stats["std"] == pytest.approx(scores.double().std(correction=0).item(), abs=1e-5)
    z = RewardModel.load(model_dir, "cpu", normalize=True).score(texts)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4) and z.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(scorer.score(texts, normalize=True), z)


def test_resume_after_interruption_matches_uninterrupted_run(tiny_backbone, data, tmp_path, monkeypatch):
    cfg = {"steps": 8, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "max_length": 16, "eval_every": 100,
           "checkpoint_every": 3}
    _run(tiny_backbone, data, tmp_path / "straight", cfg)

    real_save = checkpoint.save_state

    def save_then_die(path, fingerprint, **state):
        real_save(path, fingerprint, **state)
        if state["step"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_backbone, data, tmp_path / "resumed", cfg)
    assert (tmp_path / "resumed" / "state.pt").exists() and not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(checkpoint, "save_state", real_save)
    _run(tiny_backbone, data, tmp_path / "resumed", cfg)

    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "straight" / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6, msg=key)
    ma = read_parquet(tmp_path / "straight" / "metrics.parquet").query("metric != 'elapsed_s'")
    mb = read_parquet(tmp_path / "resumed" / "metrics.parquet").query("metric != 'elapsed_s'")
    assert len(ma) == 8 * 4 + 9  # 4 train metrics per step, 9 from the evaluation at the end
    pd.testing.assert_frame_equal(ma, mb, atol=1e-5, rtol=1e-5)


def test_lora_bf16_micro_batched_training_keeps_adapters_and_head_in_its_state(tiny_backbone, data, tmp_path,
                                                                               monkeypatch):
    cfg = {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "max_length": 16, "eval_every": 100,
           "checkpoint_every": 1, "micro_batch_size": 3, "precision": "bf16", "train": {"mode": "lora", "rank": 4}}
    monkeypatch.setattr(checkpoint, "remove_state", lambda path: None)   # keep the last state to read it
    final = _run(tiny_backbone, data, tmp_path, cfg)
    assert math.isfinite(final["pair_accuracy"])
    trained = torch.load(tmp_path / "state.pt", weights_only=True)["trained"]
    assert trained and all(".lora_" in n or "classifier" in n for n in trained)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").is_file()
    RewardModel.load(tmp_path / "model").score(["A fine film."])


def test_state_of_another_run_stops_with_the_path(tiny_backbone, data, tmp_path):
    cfg = {"steps": 2, "batch_size": 4, "max_length": 16, "checkpoint_every": 1}
    checkpoint.save_state(tmp_path / "state.pt", "another run", step=1)
    with pytest.raises(DataError, match=r"state.pt: training state of another run .*delete it"):
        _run(tiny_backbone, data, tmp_path, cfg)
    assert (tmp_path / "state.pt").exists() and not (tmp_path / "model").exists()


# ----------------------------------------------------------------------------- errors

def test_missing_and_malformed_inputs(tiny_backbone, data, tmp_path):
    cfg = {"steps": 1, "batch_size": 4}
    missing = dict(data, train=tmp_path / "nope.parquet")
    with pytest.raises(DataError, match="nope.parquet: file not found"):
        _run(tiny_backbone, missing, tmp_path, cfg)
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"chosen": ["a"], "loser": ["b"]}).to_parquet(bad)
    with pytest.raises(DataError, match=r"bad.parquet: missing column\(s\) rejected"):
        _run(tiny_backbone, dict(data, val=bad), tmp_path, cfg)
    pd.DataFrame({"chosen": [1, 2], "rejected": ["b", "c"]}).to_parquet(bad)
    with pytest.raises(DataError, match="column 'chosen': expected text"):
        _run(tiny_backbone, dict(data, train=bad), tmp_path, cfg)
    pd.DataFrame({"text": ["a"], "rating": ["high"]}).to_parquet(bad)
    with pytest.raises(DataError, match="column 'rating': expected numbers"):
        _run(tiny_backbone, dict(data, ratings=bad), tmp_path, cfg)
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        _run(tiny_backbone, dict(data, train=bad), tmp_path, cfg)
    assert not (tmp_path / "model").exists()


def test_corrupt_state_names_the_path(tiny_backbone, data, tmp_path):
    (tmp_path / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=r"state.pt: corrupt training state .*delete it"):
        _run(tiny_backbone, data, tmp_path, {"steps": 1, "batch_size": 4})


def test_bad_backbone_and_freeze(data, tiny_backbone, tmp_path):
    with pytest.raises(ConfigError, match="'models.reward_backbone'"):
        _run(str(tmp_path / "no_such_model"), data, tmp_path, {"steps": 1})
    with pytest.raises(ConfigError, match="'reward.train_layers'"):
        _run(tiny_backbone, data, tmp_path, {"steps": 1, "train_layers": 3})


def test_load_errors_name_the_path(tmp_path, trained):
    with pytest.raises(DataError, match="no config.json"):
        RewardModel.load(tmp_path / "missing", "cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (trained[0] / "model").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(DataError, match="broken: cannot load reward model"):
        RewardModel.load(broken, "cpu")
