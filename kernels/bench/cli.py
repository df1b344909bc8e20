"""Command line: `python -m fdpipe_kernels.bench`."""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict

import torch

from .results import write_results
from .runner import run
from .settings import SMOKE, BenchSettings

log = logging.getLogger("fdpipe.bench")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fdpipe_kernels.bench",
        description="Benchmark of the kernel ops against eager torch, torch.compile and Liger-Kernel.")
    parser.add_argument("--out", default="results/bench/kernels.parquet", help="Parquet output")
    parser.add_argument("--markdown", default=None, help="also write this Markdown table (e.g. kernels/BENCHMARKS.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU configuration even when CUDA is present")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of timed repeats")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cuda = torch.cuda.is_available() and not args.smoke
    settings = BenchSettings() if cuda else BenchSettings(**asdict(SMOKE))
    if args.repeats:
        settings.repeats = args.repeats
    start = time.perf_counter()
    df, facts = run(settings, "cuda" if cuda else "cpu")
    write_results(df, facts, args.out, args.markdown)
    log.info("%d rows in %.1f s -> %s", len(df), time.perf_counter() - start, args.out)
