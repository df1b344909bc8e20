"""Process-level setup shared by the stages: seeding, threads, device, logging."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; otherwise the named device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def setup_logging(log_path=None, level=logging.INFO, *, append: bool = False) -> logging.Logger:
    """Log to `log_path` (a Snakemake `log:` file; started afresh unless `append`) and stderr."""
    handlers = [logging.StreamHandler()]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="a" if append else "w"))
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    return logging.getLogger("fdpipe")
