"""Resumable training state: one file per run, written atomically, reused only by that run.

Every training loop (SFT, reward model, alignment) saves its state through `save_state` and
reads it back through `load_state`, so they all behave the same way:

* no file: train from the start (`load_state` returns None);
* a file written for this run (same fingerprint: config, seed and inputs): resume from it;
* a file that cannot be read, or that another run wrote (the config, the seed or an input
  changed since): stop with a one-line `DataError` naming the file and saying to delete it to
  train from the start. A state is never silently discarded, never silently reused.

States hold only what changes while training: the trainable parameters (`trainable_tensors`),
optimizer and schedule, RNG streams (`rng_state`), step, metrics so far and whatever running
estimates the loop keeps. They are loaded with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from fdpipe.common.errors import DataError
from fdpipe.common.io import atomic_path, config_hash, sha256_file

log = logging.getLogger("fdpipe.training")

FORMAT = 1  # bump when the layout of a state file changes
RESTART_HINT = "delete it to train from the start"


def input_fingerprint(path_or_name) -> object:
    """What identifies one input of a run.

    A file: its sha256. A folder (a saved model): name, size and modification time of each
    of its files (hashing gigabytes of weights at every start would cost more than it saves).
    Anything else (a hub model name): the string itself.
    """
    path = Path(str(path_or_name))
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return str(path_or_name)


# When states are written, not what is computed: left out of the fingerprint, so that a
# state written under other save settings still resumes.
SAVE_KEYS = ("checkpoint_every", "checkpoint_seconds")


def fingerprint(config, seed: int, inputs: dict) -> str:
    """Hash of everything a state must match to be resumed: the stage's config (less
    `SAVE_KEYS`), the seed and its inputs (a mapping name -> path or model name)."""
    if isinstance(config, dict):
        config = {key: value for key, value in config.items() if key not in SAVE_KEYS}
    return config_hash({"config": config, "seed": seed,
                        "inputs": {name: input_fingerprint(value) for name, value in sorted(inputs.items())}})


def save_state(path, fingerprint: str, **state) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) to `path` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "fingerprint": fingerprint, **state}, tmp)


def load_state(path, fingerprint: str, map_location="cpu") -> dict | None:
    """The state at `path` if it belongs to this run; None when there is none.

    Raises `DataError` (naming the file and how to restart) when the file is unreadable, was
    written in another format, or belongs to another run.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated files, foreign pickles and zip errors raise many types
        raise DataError(path, f"corrupt training state ({type(exc).__name__}); {RESTART_HINT}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "fingerprint" not in state:
        raise DataError(path, f"not a training state of this version of fdpipe; {RESTART_HINT}")
    if state["fingerprint"] != fingerprint:
        raise DataError(path, f"training state of another run (its config, seed or inputs differ); {RESTART_HINT}")
    log.info("resuming from %s", path)
    return state


class SaveSchedule:
    """When to write the state: after every `every_steps`-th step, and after any step that ends
    `every_seconds` or more after the last write (0: no time limit), so that a kill loses at
    most that many seconds of work plus one step.

    With several processes, pass the job's `World` to `due`: rank 0's clock decides for all
    (one small all-reduce), so that every rank takes part in a save that needs them all.
    """

    def __init__(self, every_steps: int, every_seconds: float = 0.0):
        self.every_steps, self.every_seconds = int(every_steps), float(every_seconds)
        self.last = time.monotonic()

    @classmethod
    def from_config(cls, cfg: dict, default_steps: int) -> "SaveSchedule":
        """From a stage's ``checkpoint_every`` and ``checkpoint_seconds`` keys."""
        return cls(cfg.get("checkpoint_every", default_steps), cfg.get("checkpoint_seconds", 0.0))

    def due(self, step: int, world=None) -> bool:
        late = self.every_seconds > 0 and time.monotonic() - self.last >= self.every_seconds
        if world is not None:
            late = world.main_decides(late)
        return step % self.every_steps == 0 or late

    def saved(self) -> None:
        self.last = time.monotonic()


def remove_state(path) -> None:
    """Delete the state once the stage's outputs are written."""
    Path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------- contents

def training_snapshot(model: torch.nn.Module, optimizer, scheduler=None) -> dict:
    """The usual contents of a state: trainable parameters, optimizer (and schedule) and RNG."""
    snapshot = {"trained": trainable_tensors(model), "optimizer": optimizer.state_dict(), "rng": rng_state()}
    if scheduler is not None:
        snapshot["scheduler"] = scheduler.state_dict()
    return snapshot


def restore_snapshot(state: dict, path, model: torch.nn.Module, optimizer, scheduler=None) -> None:
    """Put a `training_snapshot` saved in `state` (read from `path`) back in place."""
    load_tensors(model, state["trained"], path)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def trainable_tensors(model: torch.nn.Module, names=None) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train (or of those named in `names`)."""
    if names is None:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy saved parameters into `model` (in place, on the model's device)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise DataError(path, f"state holds parameter {name} {tuple(value.shape)} that the model "
                                      f"does not have; {RESTART_HINT}")
            params[name].copy_(value.to(params[name].device))


def rng_state() -> dict:
    """torch's global CPU RNG state, and every CUDA device's when CUDA is available."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
