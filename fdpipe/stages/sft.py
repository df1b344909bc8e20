"""Supervised fine-tuning: teach the base model to continue prompts with review sentences.

Each example is ``prompt + completion + EOS``. The prompt is encoded the way the later
stages encode it for generation (``tokenizer(prompt)``), the completion without special
tokens, then EOS is appended. The loss is the mean negative log-probability of the
completion tokens (and EOS) only; prompt and padding tokens carry the label -100.
Log-probabilities come from ``kernels.linear_token_logprobs`` on the final hidden states
and the LM-head weight, so the ``[tokens, vocabulary]`` logits never exist at once.

Only the last ``sft.train_layers`` transformer blocks and the final norm train (``-1``:
every parameter, embeddings and LM head included). The loop reads top to bottom: batch ->
loss -> step -> (evaluate) -> (checkpoint). A checkpoint (``state.pt``: trained
parameters, optimizer, scheduler, step, RNG, metrics so far) is written every
``checkpoint_every`` steps beside the model folder, so a killed run resumes where it
stopped; it is only reused when it was written for the same config, seed, model and data.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import atomic_path, config_hash, provenance, read_parquet, sha256_file, write_parquet
from fdpipe.models.causal_lm import load_causal_lm, load_tokenizer, save_causal_lm
from fdpipe.common.runtime import pick_device, seed_everything, set_threads

log = logging.getLogger("fdpipe.sft")

IGNORE = -100
LOG_EVERY = 10  # steps between progress lines in the log (the progress bar goes to stderr)
INT_KEYS = {"steps": 1, "batch_size": 1, "warmup_steps": 0, "max_length": 2, "eval_every": 1,
            "eval_batches": 1, "checkpoint_every": 1}
FLOAT_KEYS = {"lr": "> 0", "weight_decay": ">= 0", "grad_clip": ">= 0 (0 = off)"}


def check_config(cfg: dict) -> None:
    """Raise ConfigError naming the first `sft.*` key that is missing or out of range."""
    for key, low in INT_KEYS.items():
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"sft.{key}", f"an integer >= {low}", v)
    for key, rule in FLOAT_KEYS.items():
        v = cfg.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < 0 or (rule == "> 0" and v == 0):
            raise ConfigError(f"sft.{key}", f"a number {rule}", v)
    v = cfg.get("train_layers")
    if not isinstance(v, int) or isinstance(v, bool) or v < -1:
        raise ConfigError("sft.train_layers", "an integer >= 0, or -1 for all parameters", v)


# ---------------------------------------------------------------------------- examples

def encode_examples(tokenizer, prompts, completions, max_length: int):
    """Token ids and prompt length of each example, EOS appended when it fits.

    Returns a list of (ids, n_prompt). An example longer than `max_length` keeps its prompt
    and as much of the completion as fits (then without EOS); at least one completion token
    is kept, cutting the prompt from the left if it must.
    """
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    examples = []
    for p, c in zip(prompt_ids, completion_ids):
        p = list(p)[-(max_length - 1):]
        c = list(c) + [eos]
        c = c[:max_length - len(p)]
        examples.append((p + c, len(p)))
    return examples


def collate(examples, pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of (ids, n_prompt) into tensors.

    input_ids/attention_mask/position_ids/labels [B, T]; labels hold the token id on
    completion tokens and -100 on prompt and padding. Position ids count real tokens only,
    so left and right padding give the same result.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        start = 0 if padding_side == "right" else width - len(ids)
        span = slice(start, start + len(ids))
        input_ids[row, span] = torch.tensor(ids)
        mask[row, span] = 1
        labels[row, start + n_prompt:start + len(ids)] = torch.tensor(ids[n_prompt:])
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            "labels": labels}


# ---------------------------------------------------------------------------- model

def _decoder_blocks(model):
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise ConfigError("sft.train_layers", "a model whose decoder blocks can be found "
                                          "(base_model.layers / .h / .blocks), or -1",
                      type(model).__name__)


def _final_norm(model):
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def set_trainable(model, train_layers: int, key: str = "sft.train_layers") -> list[torch.nn.Parameter]:
    """Freeze everything but the last `train_layers` blocks and the final norm (-1: train all).

    Returns the trainable parameters. With tied input/output embeddings (SmolLM2) the
    embeddings and LM head stay frozen unless `train_layers` is -1.
    """
    if train_layers == -1:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        blocks = _decoder_blocks(model)
        if train_layers > len(blocks):
            raise ConfigError(key, f"at most {len(blocks)} (the model's blocks) "
                                                  f"or -1", train_layers)
        for p in model.parameters():
            p.requires_grad_(False)
        chosen = list(blocks[len(blocks) - train_layers:])
        norm = _final_norm(model)
        if norm is not None:
            chosen.append(norm)
        for module in chosen:
            for p in module.parameters():
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def token_logprobs(model, batch: dict) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1, [B, T-1]; 0 where the label is -100.

    Runs the decoder for the final hidden states and lets `kernels.linear_token_logprobs`
    apply the LM head in chunks, on the labelled (completion) positions only: the LM head
    over a 49k vocabulary costs as much as several transformer blocks, and prompt and
    padding positions would only give zeros.
    """
    import fdpipe_kernels as kernels

    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    picked = kernels.linear_token_logprobs(hidden[:, :-1][keep], head.weight, targets[keep],
                                           bias=getattr(head, "bias", None), ignore_index=IGNORE)
    logp = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)
    return logp.masked_scatter(keep, picked)


def completion_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean negative log-probability over completion tokens, and their number."""
    logp = token_logprobs(model, batch)
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    return -logp.sum() / max(n_tokens, 1), n_tokens


@torch.no_grad()
def evaluate(model, batches, device) -> dict[str, float]:
    """Token-weighted mean completion loss and its perplexity over `batches`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = completion_loss(model, batch)
        total += float(loss) * n
        count += n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


# ---------------------------------------------------------------------------- schedule / data order

def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Example indices of training step `step`: epochs of seeded permutations, laid end to end.

    Depends only on (step, batch_size, n, seed), so a resumed run sees the same batches.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def _optimizer(params, cfg):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg["lr"])


# ---------------------------------------------------------------------------- state

def _model_fingerprint(model_path) -> object:
    """Name for hub models; (file, size, mtime) of every file for local folders."""
    path = Path(model_path)
    if not path.is_dir():
        return str(model_path)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                  if p.is_file())


def run_fingerprint(model_path, train_path, val_path, cfg, seed) -> str:
    """What a checkpoint must match to be resumed."""
    return config_hash({"sft": cfg, "seed": seed, "model": _model_fingerprint(model_path),
                        "train": sha256_file(train_path), "val": sha256_file(val_path)})


def save_state(path, fingerprint, step, model, optimizer, scheduler, metrics) -> None:
    trained = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = {"fingerprint": fingerprint, "step": step, "trained": trained,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": torch.get_rng_state(), "metrics": metrics}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path, fingerprint):
    """The checkpoint at `path` if it exists and matches `fingerprint`, else None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start over rather than fail
        log.warning("ignoring unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s belongs to another config, model or data; starting over", path)
        return None
    return state


# ---------------------------------------------------------------------------- stage

def run(model_path, train_path, val_path, cfg: dict, seed: int, out_dir, metrics_path,
        state_path, device="auto", threads=None) -> pd.DataFrame:
    """Fine-tune `model_path` on sft_train, write the model to `out_dir` and metrics.

    Metrics (tidy: step, split, metric, value): per training step loss, perplexity,
    tokens_per_s (prompt and completion tokens), seconds, lr, grad_norm; on val at step 0, every `eval_every` steps and at the end,
    loss and perplexity. Returns the metrics frame.
    """
    from tqdm.auto import tqdm

    check_config(cfg)
    set_threads(threads)
    device = pick_device(device)
    seed_everything(seed)
    fingerprint = run_fingerprint(model_path, train_path, val_path, cfg, seed)

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, device=device)
    train_df, val_df = read_parquet(train_path), read_parquet(val_path)
    for name, df, path in (("train", train_df, train_path), ("val", val_df, val_path)):
        missing = {"prompt", "completion"} - set(df.columns)
        if missing or len(df) == 0:
            raise DataError(path, f"expected a non-empty table with prompt and completion "
                                  f"columns (missing {sorted(missing)}, {len(df)} rows)")
    train_ex = encode_examples(tokenizer, train_df["prompt"], train_df["completion"],
                               cfg["max_length"])
    val_ex = encode_examples(tokenizer, val_df["prompt"], val_df["completion"], cfg["max_length"])
    bs = cfg["batch_size"]
    val_order = np.random.default_rng([seed, 1]).permutation(len(val_ex))
    val_order = val_order[:bs * cfg["eval_batches"]]
    val_batches = [collate([val_ex[i] for i in val_order[j:j + bs]], tokenizer.pad_token_id)
                   for j in range(0, len(val_order), bs)]

    params = set_trainable(model, cfg["train_layers"])
    n_train = sum(p.numel() for p in params)
    log.info("model %s: %.1fM of %.1fM parameters train; %d train / %d val examples; device %s",
             model_path, n_train / 1e6, sum(p.numel() for p in model.parameters()) / 1e6,
             len(train_ex), len(val_ex), device)
    optimizer = _optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg["warmup_steps"], cfg["steps"]))

    metrics: list[dict] = []
    start = 0
    state = load_state(state_path, fingerprint)
    if state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trained"].items():
                named[name].copy_(value.to(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        metrics, start = list(state["metrics"]), int(state["step"])
        log.info("resumed from %s at step %d", state_path, start)

    def record(step, split, values):
        metrics.extend({"step": step, "split": split, "metric": k, "value": float(v)}
                       for k, v in values.items())

    if start == 0:
        val = evaluate(model, val_batches, device)
        record(0, "val", val)
        log.info("step 0: val loss %.4f", val["loss"])

    model.train()
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="sft",
               mininterval=5.0)
    for step in bar:
        t0 = time.perf_counter()
        idx = batch_indices(step, bs, len(train_ex), seed)
        batch = {k: v.to(device) for k, v in
                 collate([train_ex[i] for i in idx], tokenizer.pad_token_id).items()}
        loss, _ = completion_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - t0
        done = step + 1
        value = loss.detach().item()
        record(done, "train", {"loss": value, "perplexity": math.exp(min(value, 50.0)),
                               "tokens_per_s": int(batch["attention_mask"].sum()) / seconds,
                               "seconds": seconds, "lr": lr, "grad_norm": float(grad_norm)})
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        if done % LOG_EVERY == 0:
            log.info("step %d/%d: train loss %.4f (%.2f s/step)", done, cfg["steps"], value,
                     seconds)
        if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
            val = evaluate(model, val_batches, device)
            record(done, "val", val)
            log.info("step %d: train loss %.4f, val loss %.4f", done, value, val["loss"])
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            save_state(state_path, fingerprint, done, model, optimizer, scheduler, metrics)
    bar.close()

    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    save_causal_lm(model, tokenizer, out_dir)
    table = pd.DataFrame(metrics, columns=["step", "split", "metric", "value"])
    table = table.astype({"step": "int64", "split": str, "metric": str, "value": "float64"})
    write_parquet(table, metrics_path, provenance(cfg, seed, stage="sft", model=str(model_path),
                                                  trained_parameters=n_train))
    if Path(state_path).exists():
        os.remove(state_path)
    return table
