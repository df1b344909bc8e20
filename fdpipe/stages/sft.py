"""Supervised fine-tuning: teach the base model to continue prompts with review sentences.

Each example is ``prompt + completion + EOS``. The prompt is encoded the way the later
stages encode it for generation (``tokenizer(prompt)``), the completion without special
tokens, then EOS is appended. The loss is the mean negative log-probability of the
completion tokens (and EOS) only; prompt and padding tokens carry the label -100.
Log-probabilities come from ``fdpipe_kernels.linear_token_logprobs`` on the final hidden states
and the LM-head weight, so the ``[tokens, vocabulary]`` logits never exist at once.

Only the last ``sft.train_layers`` transformer blocks and the final norm train (``-1``:
every parameter, embeddings and LM head included), or what ``sft.train`` says (``full``,
``last_layers`` or ``lora``: adapters only, saved merged into the model and beside it in
``adapter/``; `fdpipe.models.lora`). ``sft.precision: bf16`` runs the forward passes under
bfloat16 autocast (`fdpipe.models.precision`) and each batch runs in groups of rows of
similar length, padded only to their longest row, whose gradients add up to the batch's
(`accumulate_gradients`; ``sft.micro_batch_size`` caps a group's rows). The loop reads top to bottom: batch ->
loss -> step -> (evaluate) -> (checkpoint). A checkpoint (``state.pt``: trained
parameters, optimizer, scheduler, step, RNG, metrics so far) is written every
``checkpoint_every`` steps (and after any step ending ``checkpoint_seconds`` after the last
write) beside the model folder, so a killed run resumes where it
stopped (`fdpipe.training.checkpoint`: a state written for another config, seed, model or
data stops the stage with a message naming the file).
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd
import torch

from fdpipe.common.errors import ConfigError
from fdpipe.common.io import provenance, read_parquet, write_parquet
from fdpipe.common.runtime import seed_everything, set_threads
from fdpipe.models import lora
from fdpipe.models.causal_lm import load_causal_lm, load_tokenizer
from fdpipe.models.trainable import eval_mode, train_spec
from fdpipe.training import checkpoint, distributed, guards, optim
from fdpipe.models import precision as precisions
from fdpipe.training.batches import epoch_batches, padded_groups
from fdpipe.training.distributed import World

log = logging.getLogger("fdpipe.sft")

IGNORE = -100
EXAMPLE_COLUMNS = {"prompt": "text", "completion": "text"}
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
    v = cfg.get("checkpoint_seconds", 0)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ConfigError("sft.checkpoint_seconds", "a number >= 0 (0 = save by steps only)", v)
    v = cfg.get("train_layers")
    if not isinstance(v, int) or isinstance(v, bool) or v < -1:
        raise ConfigError("sft.train_layers", "an integer >= 0, or -1 for all parameters", v)
    v = cfg.get("micro_batch_size")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ConfigError("sft.micro_batch_size", "a positive integer or null (the whole batch)", v)
    precisions.check(cfg.get("precision"), "sft.precision")
    train_spec(cfg, "sft")


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

def token_logprobs(model, batch: dict, precision: str = "fp32") -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1, [B, T-1]; 0 where the label is -100.

    Runs the decoder for the final hidden states and lets `fdpipe_kernels.linear_token_logprobs`
    apply the LM head in chunks, on the labelled (completion) positions only: the LM head
    over a 49k vocabulary costs as much as several transformer blocks, and prompt and
    padding positions would only give zeros.

    With ``precision: bf16`` the decoder runs under autocast (`fdpipe.models.precision`); the
    fused LM head and its log-softmax take the hidden states upcast to float32 and run outside
    autocast (their backward recomputes the logits, which must see the same dtypes).
    """
    import fdpipe_kernels

    with precisions.autocast(precision, batch["input_ids"].device):
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    hidden = precisions.upcast(hidden)
    head = model.get_output_embeddings()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    picked = fdpipe_kernels.linear_token_logprobs(hidden[:, :-1][keep], head.weight, targets[keep],
                                           bias=getattr(head, "bias", None), ignore_index=IGNORE)
    logp = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)
    return logp.masked_scatter(keep, picked)


def completion_loss(model, batch: dict, precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """Mean negative log-probability over completion tokens, and their number."""
    logp = token_logprobs(model, batch, precision)
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    return -logp.sum() / max(n_tokens, 1), n_tokens


def validation_loss(model, batches, device, world: World = World(), precision: str = "fp32",
                    micro_batch_size: int | None = None) -> dict[str, float]:
    """Token-weighted mean completion loss and its perplexity over `batches` (over every
    rank's batches when several processes share them), `micro_batch_size` rows at a time."""
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            for part in row_groups(batch, micro_batch_size):
                part = {k: v.to(device) for k, v in part.items()}
                loss, n = completion_loss(model, part, precision)
                total += float(loss) * n
                count += n
    if world.size > 1:
        total, count = world.sum(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def row_groups(batch: dict, max_rows: int | None = None) -> list[dict]:
    """The batch's rows in groups of similar length, at most `max_rows` rows each, every group
    cut to the columns its rows use (`padded_groups`): the same tokens with less padding."""
    return [part for _, part in padded_groups(batch, max_rows)]


def accumulate_gradients(model, batch: dict, micro_batch_size: int | None, precision: str, world: World, *,
                         step: int, state_path, optimizer) -> torch.Tensor:
    """Zero the gradients, then backpropagate the batch's mean completion loss group by group:
    rows of similar length, each group padded only to its longest row and holding at most
    `micro_batch_size` rows (`row_groups`; None: no row limit). Group ``m`` with ``n_m`` of the
    batch's ``N`` completion tokens (``N`` over every process) contributes its mean loss times
    ``n_m / N``, so the losses add up to the batch's mean loss and the gradients to its
    gradient. Returns this process's part of that loss (detached).
    """
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    chunks = row_groups(batch, micro_batch_size)
    total_tokens = n_tokens
    if world.size > 1:
        total_tokens = float(world.sum(torch.tensor(n_tokens, device=batch["input_ids"].device)))
    optimizer.zero_grad(set_to_none=True)
    total = None
    for part in chunks:
        loss, part_tokens = completion_loss(model, part, precision)
        guards.check(step, state_path, loss=loss.detach())
        if len(chunks) > 1 or world.size > 1:   # this part's share of the global batch's mean loss
            loss = loss * (part_tokens / total_tokens)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


# ---------------------------------------------------------------------------- stage

def run(*, model_path, train_path, val_path, cfg: dict, seed: int, out_dir, metrics_path,
        state_path, device="auto", threads=None, processes: int = 1) -> pd.DataFrame:
    """Fine-tune `model_path` on sft_train, write the model to `out_dir` and metrics.

    Metrics (tidy: step, split, metric, value): per training step loss, perplexity,
    tokens_per_s (prompt and completion tokens), seconds, lr, grad_norm; on val at step 0,
    every `eval_every` steps and at the end, loss and perplexity. Returns the metrics frame.

    With ``processes > 1`` the stage runs data-parallel under torchrun: each process takes its
    share of every batch, and the loss curve is that of one process on the same batches.
    """
    check_config(cfg)
    distributed.check_processes(processes, "sft.processes")
    if cfg["batch_size"] < processes:
        raise ConfigError("sft.batch_size", f"at least sft.processes ({processes})", cfg["batch_size"])
    if processes > 1 and not distributed.in_launched_job():
        distributed.relaunch(run, dict(model_path=model_path, train_path=train_path, val_path=val_path, cfg=cfg,
                                       seed=seed, out_dir=out_dir, metrics_path=metrics_path,
                                       state_path=state_path, device=device, threads=threads), processes)
        return read_parquet(metrics_path)
    set_threads(threads)
    with distributed.world(device) as (world, dev):
        return _train(model_path, train_path, val_path, cfg, seed, out_dir, metrics_path, state_path, world, dev)


def _train(model_path, train_path, val_path, cfg, seed, out_dir, metrics_path, state_path, world: World,
           device) -> pd.DataFrame:
    from tqdm.auto import tqdm

    seed_everything(seed)
    precision, micro = precisions.check(cfg.get("precision"), "sft.precision"), cfg.get("micro_batch_size")
    fingerprint = checkpoint.fingerprint({**cfg, "processes": world.size}, seed,
                                         {"model": model_path, "train": train_path, "val": val_path})

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, device=device)
    train_df = read_parquet(train_path, required=EXAMPLE_COLUMNS, min_rows=1)
    val_df = read_parquet(val_path, required=EXAMPLE_COLUMNS, min_rows=1)
    train_ex = encode_examples(tokenizer, train_df["prompt"], train_df["completion"],
                               cfg["max_length"])
    val_ex = encode_examples(tokenizer, val_df["prompt"], val_df["completion"], cfg["max_length"])
    bs = cfg["batch_size"]
    val_order = np.random.default_rng([seed, 1]).permutation(len(val_ex))
    val_order = val_order[:bs * cfg["eval_batches"]]
    val_batches = [collate([val_ex[i] for i in val_order[j:j + bs]], tokenizer.pad_token_id)
                   for j in range(0, len(val_order), bs)]

    trainable = lora.prepare(model, train_spec(cfg, "sft"), key="sft")
    params = trainable.params
    n_train = sum(p.numel() for p in params)
    log.info("model %s: %.1fM of %.1fM parameters train; %d train / %d val examples; device %s; %d process(es)",
             model_path, n_train / 1e6, sum(p.numel() for p in model.parameters()) / 1e6,
             len(train_ex), len(val_ex), device, world.size)
    optimizer = optim.adamw(params, cfg["lr"], cfg["weight_decay"])
    scheduler = optim.lr_schedule(optimizer, "cosine", cfg["warmup_steps"], cfg["steps"])

    metrics: list[dict] = []
    start = 0
    saves = checkpoint.SaveSchedule.from_config(cfg, default_steps=50)
    state = checkpoint.load_state(state_path, fingerprint)
    if state is not None:
        checkpoint.restore_snapshot(state, state_path, model, optimizer, scheduler)
        metrics, start = list(state["metrics"]), int(state["step"])
        log.info("resumed at step %d", start)

    def record(step, split, values):
        metrics.extend({"step": step, "split": split, "metric": k, "value": float(v)}
                       for k, v in values.items())

    if start == 0:
        val = validation_loss(model, world.shard(val_batches), device, world, precision, micro)
        record(0, "val", val)
        log.info("step 0: val loss %.4f", val["loss"])

    model.train()
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="sft",
               mininterval=5.0, disable=not world.is_main)
    for step in bar:
        t0 = time.perf_counter()
        idx = world.shard(epoch_batches(step, bs, len(train_ex), seed))
        batch = {k: v.to(device) for k, v in
                 collate([train_ex[i] for i in idx], tokenizer.pad_token_id).items()}
        loss = accumulate_gradients(model, batch, micro, precision, world,
                                    step=step + 1, state_path=state_path, optimizer=optimizer)
        world.sum_gradients(params)
        lr = scheduler.get_last_lr()[0]
        grad_norm = optim.clipped_step(optimizer, params, cfg["grad_clip"], scheduler, step=step + 1,
                                       state_path=state_path)
        seconds = time.perf_counter() - t0
        done = step + 1
        value = world.sum(loss.detach()).item()
        tokens = int(world.sum(batch["attention_mask"].sum()))
        record(done, "train", {"loss": value, "perplexity": math.exp(min(value, 50.0)),
                               "tokens_per_s": tokens / seconds,
                               "seconds": seconds, "lr": lr, "grad_norm": float(grad_norm)})
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        if done % LOG_EVERY == 0:
            log.info("step %d/%d: train loss %.4f (%.2f s/step)", done, cfg["steps"], value,
                     seconds)
        if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
            val = validation_loss(model, world.shard(val_batches), device, world, precision, micro)
            record(done, "val", val)
            log.info("step %d: train loss %.4f, val loss %.4f", done, value, val["loss"])
        if world.is_main and (saves.due(done) or done == cfg["steps"]):
            checkpoint.save_state(state_path, fingerprint, step=done, metrics=metrics,
                                  **checkpoint.training_snapshot(model, optimizer, scheduler))
            saves.saved()
    bar.close()

    table = pd.DataFrame(metrics, columns=["step", "split", "metric", "value"])
    table = table.astype({"step": "int64", "split": str, "metric": str, "value": "float64"})
    if world.is_main:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        trainable.save(tokenizer, out_dir)   # LoRA: adapters merged, the adapter in out_dir/adapter
        write_parquet(table, metrics_path, provenance(cfg, seed, stage="sft", model=str(model_path),
                                                      trained_parameters=n_train, processes=world.size))
        checkpoint.remove_state(state_path)
    world.barrier()
    return table
