"""Benchmark of the kernel ops against eager torch, torch.compile and Liger-Kernel.

`python -m fdpipe_kernels.bench` measures every op (token_logprobs, token_divergences,
linear_token_logprobs) in four modes -- forward (inputs require grad), backward (the
forward runs untimed first), forward_backward, no_grad -- over a grid of token counts N,
vocabulary sizes V and dtypes, on realistic peaked logits. Baselines run in the same process
on the same inputs: eager torch (log_softmax + gather; textbook divergences), torch.compile
of the same functions (only at one headline shape, to fit a time budget) and Liger-Kernel
(cross entropy / fused linear cross entropy with reduction='none' read as -log p,
LigerJSD on log_softmax outputs; CUDA only).

Each row records the median time, the effective bandwidth (the minimum bytes the op must
move, divided by the time) as a fraction of the device's copy bandwidth (a torch copy of a
tensor of the logits' size, measured in the same run), for the LM head the TFLOP/s, the peak
extra memory, and on fdpipe rows the speedups over each baseline. Results go to a Parquet
file (with provenance) and a Markdown table.

Without CUDA it runs a smoke configuration (tiny shapes, the torch reference and eager only)
that finishes in seconds; the numbers then only show that the harness works.

Modules: `settings` (ops, modes, baselines, `BenchSettings`, the grid), `workloads` (inputs,
implementations, bytes and FLOPs per case), `timing` (clock, repeats, copy bandwidth),
`runner` (the measurement loop), `results` (speedups, Markdown, Parquet with provenance),
`cli` (the command line).
"""
from __future__ import annotations

from .cli import main
from .results import add_speedups, markdown, write_results
from .runner import run
from .settings import BASELINES, DTYPES, MODES, OPS, SMOKE, BenchSettings, cases, settings_from_config
from .timing import Clock, copy_bandwidth, measure
from .workloads import implementations, make_inputs, min_bytes, useful_flops

__all__ = [
    "BASELINES", "DTYPES", "MODES", "OPS", "SMOKE", "BenchSettings", "Clock", "add_speedups", "cases",
    "copy_bandwidth", "implementations", "main", "make_inputs", "markdown", "measure", "min_bytes", "run",
    "settings_from_config", "useful_flops", "write_results",
]
