"""Optimizers, learning-rate schedules and the clipped optimizer step shared by every loop."""
from __future__ import annotations

import math

import torch

from fdpipe.training import guards


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `params`; weight decay applies to matrices only (not to biases and norms).

    With ``weight_decay = 0`` this is exactly Adam.
    """
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def clipped_step(optimizer: torch.optim.Optimizer, params, grad_clip: float,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, step: int,
                 state_path=None) -> torch.Tensor:
    """Clip the global gradient norm to `grad_clip` (0: no clipping), step the optimizer and
    the schedule; return the norm before clipping.

    A non-finite norm stops training (`guards.NonFiniteError` naming `step`) before the
    optimizer touches the parameters.
    """
    norm = torch.nn.utils.clip_grad_norm_(list(params), grad_clip if grad_clip > 0 else math.inf)
    guards.check(step, state_path, gradient_norm=norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norm


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup to 1 at step `warmup_steps` ((step + 1) / warmup), then
    cosine decay to 0 at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor: linear warmup ((step + 1) / (warmup + 1)), then linear decay to 0 at
    `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `warmup_cosine` (``kind='cosine'``) or `warmup_linear`."""
    factor = SCHEDULES[kind]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(s, warmup_steps, total_steps))
