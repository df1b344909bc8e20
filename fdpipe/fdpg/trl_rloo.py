"""TRL's RLOO trainer timed on the alignment benchmark's configuration (optional baseline).

`time_steps` runs ``trl.RLOOTrainer`` itself (not a re-implementation of its step) on the
same causal LM with the same trainable parameters (the last ``train_layers`` blocks and the
final norm, chosen by `fdpipe.models.trainable.set_trainable`), ``prompts_per_step`` prompts ×
``samples_per_prompt`` generations per optimizer step, ``max_new_tokens`` new tokens, KL
coefficient ``beta`` against the frozen starting model, temperature 1, no top-k/top-p, no
gradient checkpointing, float32 on the CPU, and the same reward model (a callable reward
function scoring prompt + completion). Per step it records the seconds of generation
(``sample``), of the rest of ``_generate_and_score_completions`` (reward and reference
forward: ``score``), of the rest of the optimizer step (``train``) and of the whole step.

Without ``trl`` installed, `time_steps` returns ``(None, message)``.
"""
from __future__ import annotations

import copy
import tempfile
import time

import torch

from fdpipe.models import causal_lm
from fdpipe.models.trainable import set_trainable


def version() -> str | None:
    try:
        from importlib.metadata import version as _version

        return _version("trl")
    except Exception:   # not installed
        return None


def _timed(owner, name: str, log: list[float]):
    """Replace the bound method `name` of `owner` by one that appends its seconds to `log`."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def time_steps(model_path, scorer, prompt_texts: list[str], cfg: dict, seed: int):
    """``({phase: [seconds per timed step]}, note)``, or ``(None, reason)`` without trl."""
    if version() is None:
        return None, "trl_rloo skipped: trl is not installed (pip install -e \".[bench]\")"
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    torch.manual_seed(seed)
    tokenizer = causal_lm.load_tokenizer(model_path)
    model = causal_lm.load_causal_lm(model_path, "cpu")
    set_trainable(model, cfg["train_layers"], key="train_layers")
    batch = cfg["prompts_per_step"] * cfg["samples_per_prompt"]
    total = cfg["warmup"] + cfg["steps"]
    prompts = [prompt_texts[i % len(prompt_texts)] for i in range(cfg["prompts_per_step"] * total)]

    def reward(prompts, completions, **_):
        return scorer.score([p + c for p, c in zip(prompts, completions)]).tolist()

    marks: dict[str, list[float]] = {"step": [], "gen_score": [], "sample": []}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks["_t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            marks["step"].append(time.perf_counter() - marks.pop("_t0"))

    with tempfile.TemporaryDirectory(prefix="fdpipe-rloo-") as out:
        args = RLOOConfig(output_dir=out, per_device_train_batch_size=batch,
                          num_generations=cfg["samples_per_prompt"], steps_per_generation=1,
                          gradient_accumulation_steps=1, max_completion_length=cfg["max_new_tokens"],
                          temperature=1.0, top_k=0, top_p=1.0, beta=cfg["beta"], learning_rate=cfg["lr"],
                          max_steps=total, num_iterations=1, gradient_checkpointing=False, use_cpu=True,
                          bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=total,
                          seed=seed, disable_dropout=True, shuffle_dataset=False)
        trainer = RLOOTrainer(model=model, reward_funcs=reward, args=args, processing_class=copy.copy(tokenizer),
                              train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepTimes()])
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        _timed(trainer, "_generate", marks["sample"])
        _timed(trainer, "_generate_and_score_completions", marks["gen_score"])
        trainer.train()
    warm = cfg["warmup"]
    step, gen_score, sample = (marks[k][warm:] for k in ("step", "gen_score", "sample"))
    times = {"step": step, "sample": sample, "score": [g - s for g, s in zip(gen_score, sample)],
             "train": [t - g for t, g in zip(step, gen_score)]}
    return times, f"trl_rloo: trl {version()} RLOOTrainer, {trained} trainable parameters"
