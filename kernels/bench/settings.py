"""What the benchmark measures: the ops, modes, baselines and dtypes, the settings and the grid."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

OPS = ("token_logprobs", "token_divergences", "linear_token_logprobs")
MODES = ("forward", "backward", "forward_backward", "no_grad")
BASELINES = ("eager", "compile", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSettings:
    """What to measure. Defaults are the full GPU grid; `SMOKE` is the CPU configuration."""

    ops: list = field(default_factory=lambda: list(OPS))
    modes: list = field(default_factory=lambda: list(MODES))
    n_tokens: list = field(default_factory=lambda: [4096, 16384, 32768])
    vocab: list = field(default_factory=lambda: [32000, 50257, 128256, 151936])
    dtypes: list = field(default_factory=lambda: ["bfloat16", "float32"])
    baselines: list = field(default_factory=lambda: list(BASELINES))
    hidden: int = 4096
    # The LM head is compute-bound (4 matmuls of 2*N*V*H FLOP for forward+backward), so it
    # runs on a smaller grid, and in float32 (no TF32) only up to this many tokens.
    linear_n_tokens: list = field(default_factory=lambda: [4096, 16384])
    linear_vocab: list = field(default_factory=lambda: [32000, 128256])
    linear_float32_max_tokens: int = 4096
    compile_shape: list = field(default_factory=lambda: [16384, 128256])
    compile_dtypes: list = field(default_factory=lambda: ["bfloat16"])
    warmup: int = 2  # the first call compiles (Triton JIT, torch.compile); the last one sets the repeats
    repeats: int = 10
    max_case_seconds: float = 0.5  # fewer repeats (at least 2) when one call is slow
    threads: int = 0  # CPU threads for torch during the run (0 = leave as is)
    seed: int = 0


SMOKE = BenchSettings(
    n_tokens=[64, 256], vocab=[1000, 5000], dtypes=["float32"], baselines=["eager"], hidden=64,
    linear_n_tokens=[64, 256], linear_vocab=[1000, 5000], linear_float32_max_tokens=256,
    compile_shape=[], compile_dtypes=[], warmup=1, repeats=3, max_case_seconds=0.2, threads=1,
)


def settings_from_config(section: dict | None, cuda: bool) -> BenchSettings:
    """The config's `benchmark` section: `full` keys on CUDA, `smoke` keys otherwise."""
    section = section or {}
    base = BenchSettings() if cuda else BenchSettings(**asdict(SMOKE))
    overrides = section.get("full" if cuda else "smoke", {}) or {}
    known = {f.name for f in fields(BenchSettings)}
    values = {**asdict(base), **{k: v for k, v in overrides.items() if k in known}}
    if "seed" in section:
        values["seed"] = section["seed"]
    return BenchSettings(**values)


def validate(settings: BenchSettings) -> None:
    """ValueError naming the `benchmark.<key>` whose values are not among the known ones."""
    for key, allowed in (("ops", OPS), ("modes", MODES), ("dtypes", DTYPES), ("baselines", BASELINES)):
        bad = [x for x in getattr(settings, key) if x not in allowed]
        if bad:
            raise ValueError(f"benchmark.{key}: expected values among {', '.join(allowed)}, got {bad}")


def cases(settings: BenchSettings):
    """(op, dtype name, n, v) in run order."""
    for op in settings.ops:
        for dtype in settings.dtypes:
            linear = op == "linear_token_logprobs"
            for n in (settings.linear_n_tokens if linear else settings.n_tokens):
                if linear and dtype == "float32" and n > settings.linear_float32_max_tokens:
                    continue
                for v in (settings.linear_vocab if linear else settings.vocab):
                    yield op, dtype, n, v
