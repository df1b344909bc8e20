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
* ``state_path``: resumable training state while training runs (trainable parameters,
  optimizer, scheduler, step, RNG, metrics so far; `fdpipe.training.checkpoint`), written
  every ``checkpoint_every`` steps and removed once the outputs are written. A killed run
  started again with the same inputs, config and seed continues from it and ends with the
  same model.

The scorer that alignment and evaluation use is `fdpipe.models.reward_model.RewardModel`.
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

from fdpipe.common.config import known_keys
from fdpipe.common.errors import ConfigError
from fdpipe.common.io import atomic_dir, provenance, read_parquet, write_parquet
from fdpipe.common.runtime import seed_everything, set_threads
from fdpipe.models import precision as precisions
from fdpipe.models.reward_model import STATS_FILE, RewardModel, load_backbone
from fdpipe.models import lora
from fdpipe.models.trainable import train_spec
from fdpipe.training import checkpoint, distributed, guards, optim
from fdpipe.training.batches import batches_per_epoch, length_bucketed_batches, micro_batches, padded_groups
from fdpipe.training.distributed import World

log = logging.getLogger("fdpipe.reward")

PAIR_COLUMNS = {"chosen": "text", "rejected": "text"}
RATING_COLUMNS = {"text": "text", "rating": "number"}
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
    checkpoint_seconds: float = 30.0  # ... and after any step ending this long after the last write
    micro_batch_size: int | None = None  # pairs per forward/backward pass (None: the whole batch)
    precision: str | None = None    # fp32 | bf16 (None: fp32); autocast of the forward passes
    train: dict | None = None       # what trains (fdpipe.models.trainable.train_spec); None: train_layers

    @classmethod
    def from_dict(cls, cfg: dict | None) -> "RewardConfig":
        """Build from a config section, filling defaults; raise ConfigError on bad values."""
        out = cls(**known_keys(cfg, [f.name for f in dataclasses.fields(cls)], "reward"))
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
        need("checkpoint_seconds", is_num(self.checkpoint_seconds) and math.isfinite(self.checkpoint_seconds)
             and self.checkpoint_seconds >= 0, "a number >= 0 (0 = save by steps only)")
        need("micro_batch_size", self.micro_batch_size is None or (is_int(self.micro_batch_size)
                                                                   and self.micro_batch_size >= 1),
             "a positive integer or null (the whole batch)")
        need("precision", self.precision is None or self.precision in precisions.PRECISIONS,
             f"one of {', '.join(precisions.PRECISIONS)}")
        train_spec(dataclasses.asdict(self), "reward")

    def total_steps(self, n_pairs: int) -> int:
        """Optimizer steps of the whole run for a training set of `n_pairs` pairs."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch(n_pairs, self.batch_size)))


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

def read_pairs(path) -> pd.DataFrame:
    """Preference pairs (columns chosen, rejected: text)."""
    return read_parquet(path, required=PAIR_COLUMNS, min_rows=1)


def read_ratings(path) -> pd.DataFrame:
    """Held-out sentences with human ratings (columns text: text, rating: number)."""
    return read_parquet(path, required=RATING_COLUMNS, min_rows=1)


def heldout_metrics(scorer: RewardModel, val: pd.DataFrame, ratings: pd.DataFrame,
                    batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out pair metrics and rating correlations; also returns the rewards of the rated texts."""
    n = len(val)
    rewards = scorer.score(list(val["chosen"]) + list(val["rejected"]), batch_size=batch_size,
                           normalize=False)
    metrics = pair_metrics(rewards[:n], rewards[n:])
    rated = scorer.score(list(ratings["text"]), batch_size=batch_size, normalize=False)
    metrics.update(rating_metrics(rated, torch.tensor(ratings["rating"].to_numpy())))
    return metrics, rated


def grouped_rewards(model, enc, precision: str) -> torch.Tensor:
    """Rewards of the encoded texts (rows of `enc`), computed in groups of rows of similar
    length, each cut to the columns its rows use (`padded_groups`): the same rewards as one
    padded forward, with less work on pad tokens."""
    device = enc["attention_mask"].device
    out, rows_in_order = [], []
    for rows, part in padded_groups(enc):
        with precisions.autocast(precision, device):
            out.append(model(**part).logits[:, 0].float())
        rows_in_order.append(rows)
    order = torch.argsort(torch.cat(rows_in_order))
    return torch.cat(out)[order]


def accumulate_gradients(model, enc, n_pairs: int, batch_size: int, config: RewardConfig, world: World, *,
                         step: int, state_path, optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradients and backpropagate the Bradley–Terry loss of this process's `n_pairs`
    pairs (`enc`: the chosen texts, then the rejected ones) in micro-batches of
    ``config.micro_batch_size`` pairs (None: all at once), each micro-batch's texts in groups of
similar length (`grouped_rewards`). Micro-batch ``m`` of ``n_m`` pairs
    contributes its loss times ``n_m / batch_size`` (the global batch), so the losses add up to
    the batch's loss and the gradients to its gradient (exactly so without dropout: each forward
    draws its own dropout masks). Returns the rewards of the chosen and rejected texts (detached).
    """
    chunks = micro_batches(n_pairs, config.micro_batch_size)
    optimizer.zero_grad(set_to_none=True)
    chosen, rejected = [], []
    for rows in chunks:
        part = enc
        if len(chunks) > 1:   # the chunk's chosen rows, then its rejected rows (same padded width)
            pick = torch.cat([torch.arange(rows.start, rows.stop), torch.arange(rows.start, rows.stop) + n_pairs])
            part = {key: value[pick.to(value.device)] for key, value in enc.items()}
        r = grouped_rewards(model, part, config.precision)
        m = rows.stop - rows.start
        r_c, r_r = r[:m], r[m:]
        loss = bt_loss(r_c, r_r, config.center_coef)
        guards.check(step, state_path, loss=loss.detach())
        if len(chunks) > 1 or world.size > 1:   # this part's share of the global batch's mean loss
            loss = loss * (m / batch_size)
        loss.backward()
        chosen.append(r_c.detach())
        rejected.append(r_r.detach())
    return torch.cat(chosen), torch.cat(rejected)


def run(*, backbone: str, prefs_train_path, prefs_val_path, ratings_path, cfg: dict, seed: int,
        out_dir, metrics_path, state_path, device: str = "auto", threads: int | None = None,
        processes: int = 1) -> dict:
    """Train the reward model and write its outputs (see the module docstring).

    `backbone`: `embedded` or an HF name/path; `cfg`: the `reward` config section;
    `ratings_path`: held-out sentences with human ratings (`text`, `rating`), used for the
    correlation metrics and the mean/std in reward_stats.json. Returns the final held-out
    metrics. With ``processes > 1`` it runs data-parallel under torchrun (each process takes
    its share of every batch; held-out evaluation runs on the main process).
    """
    config = RewardConfig.from_dict(cfg)
    distributed.check_processes(processes, "reward.processes")
    if min(config.batch_size, len(read_pairs(prefs_train_path))) < processes:
        raise ConfigError("reward.batch_size", f"at least reward.processes ({processes}) pairs", config.batch_size)
    if processes > 1 and not distributed.in_launched_job():
        distributed.relaunch(run, dict(backbone=backbone, prefs_train_path=prefs_train_path,
                                       prefs_val_path=prefs_val_path, ratings_path=ratings_path, cfg=cfg, seed=seed,
                                       out_dir=out_dir, metrics_path=metrics_path, state_path=state_path,
                                       device=device, threads=threads), processes)
        metrics = read_parquet(metrics_path)
        last = metrics[(metrics["split"] == "val") & (metrics["step"] == metrics["step"].max())]
        return dict(zip(last["metric"], last["value"].astype(float)))
    set_threads(threads)
    with distributed.world(device) as (world, dev):
        return _train(backbone, prefs_train_path, prefs_val_path, ratings_path, config, seed, out_dir,
                      metrics_path, state_path, world, dev)


def _train(backbone, prefs_train_path, prefs_val_path, ratings_path, config: RewardConfig, seed, out_dir,
           metrics_path, state_path, world: World, dev) -> dict:
    train = read_pairs(prefs_train_path)
    val = read_pairs(prefs_val_path)
    ratings = read_ratings(ratings_path)
    seed_everything(seed)

    model, tokenizer = load_backbone(backbone)
    trainable = lora.prepare(model, train_spec(dataclasses.asdict(config), "reward"), key="reward", train_head=True)
    model, params = trainable.model, trainable.params
    model.to(dev).train()
    scorer = RewardModel(model, tokenizer, max_length=config.max_length, precision=config.precision)
    total = config.total_steps(len(train))
    batch_size = min(config.batch_size, len(train))
    optimizer = optim.adamw(params, config.lr, config.weight_decay)
    scheduler = optim.lr_schedule(optimizer, "linear", config.warmup_steps, total)
    log.info("reward model %s: %d pairs, %d steps of %d pairs, %d trainable parameters, device %s",
             backbone, len(train), total, batch_size, sum(p.numel() for p in params), dev)

    fingerprint = checkpoint.fingerprint(
        {**dataclasses.asdict(config), "processes": world.size}, seed,
        {"backbone": backbone, "prefs_train": prefs_train_path, "prefs_val": prefs_val_path, "ratings": ratings_path})
    rows: list[dict] = []
    saves = checkpoint.SaveSchedule(config.checkpoint_every, config.checkpoint_seconds)
    start, elapsed = 0, 0.0  # steps done and training seconds spent before this process
    state = checkpoint.load_state(state_path, fingerprint)
    if state is not None:
        checkpoint.restore_snapshot(state, state_path, model, optimizer, scheduler)
        rows, start, elapsed = list(state["metrics"]), int(state["step"]), float(state["elapsed_s"])
        log.info("resumed at step %d", start)

    chosen, rejected = train["chosen"].tolist(), train["rejected"].tolist()
    pair_lengths = [max(len(c), len(r)) for c, r in zip(chosen, rejected)]  # characters
    final, rated = {}, None  # set by the evaluation at the last step (states are saved before it)
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, total), initial=start, total=total, desc="reward", mininterval=1.0,
               disable=not world.is_main)
    for step in bar:
        idx = world.shard(length_bucketed_batches(step, pair_lengths, batch_size, seed).tolist())
        enc = tokenizer([chosen[i] for i in idx] + [rejected[i] for i in idx], padding=True,
                        truncation=True, max_length=config.max_length, return_tensors="pt").to(dev)
        r_c, r_r = accumulate_gradients(model, enc, len(idx), batch_size, config, world, step=step + 1,
                                        state_path=state_path, optimizer=optimizer)
        world.sum_gradients(params)
        lr = scheduler.get_last_lr()[0]
        grad_norm = optim.clipped_step(optimizer, params, config.grad_clip, scheduler, step=step + 1,
                                       state_path=state_path)

        done = step + 1
        with torch.no_grad():
            pair_loss = -F.logsigmoid(r_c - r_r)
            pair_acc = (r_c > r_r).float() + 0.5 * (r_c == r_r).float()
            if world.size > 1:   # means over the global batch
                bt, acc = (world.sum(torch.stack([pair_loss.sum(), pair_acc.sum()])) / batch_size).tolist()
            else:
                bt, acc = pair_loss.mean().item(), pair_acc.mean().item()
        rows += [{"step": done, "split": "train", "metric": k, "value": float(v)}
                 for k, v in (("loss", bt), ("accuracy", acc), ("lr", lr), ("grad_norm", grad_norm))]
        bar.set_postfix(loss=f"{bt:.3f}")

        if world.is_main and (done == total or done % config.eval_every == 0):
            metrics, rated = heldout_metrics(scorer, val, ratings, config.eval_batch_size)
            metrics["elapsed_s"] = time.perf_counter() - t0
            rows += [{"step": done, "split": "val", "metric": k, "value": float(v)}
                     for k, v in metrics.items()]
            log.info("step %d/%d: val pair accuracy %.3f, margin %.3f, pearson %.3f, spearman %.3f",
                     done, total, metrics["pair_accuracy"], metrics["margin_mean"],
                     metrics["pearson"], metrics["spearman"])
            if done == total:
                final = metrics
        if world.is_main and saves.due(done) and done < total:
            checkpoint.save_state(state_path, fingerprint, step=done, elapsed_s=time.perf_counter() - t0,
                                  metrics=rows, **checkpoint.training_snapshot(model, optimizer, scheduler))
            saves.saved()
    bar.close()

    if world.is_main:
        stats = {"mean": float(rated.double().mean()), "std": float(rated.double().std(correction=0)),
                 "n": len(rated), "max_length": config.max_length,
                 "description": "reward mean and std over the held-out rated sentences"}
        model.eval()
        with atomic_dir(out_dir) as tmp:
            trainable.export(tmp).save_pretrained(tmp)   # LoRA: adapters merged, the adapter in adapter/
            tokenizer.save_pretrained(tmp)
            (Path(tmp) / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
        meta = provenance({"reward": dataclasses.asdict(config), "backbone": backbone}, seed,
                          stage="reward", total_steps=total, processes=world.size)
        write_parquet(pd.DataFrame(rows, columns=METRIC_COLUMNS), metrics_path, meta)
        checkpoint.remove_state(state_path)
        log.info("saved %s and %s (%.1f s of training)", out_dir, metrics_path, time.perf_counter() - t0)
    world.barrier()
    return final
