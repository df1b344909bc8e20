"""Running the Snakemake DAG on the tiny configuration (tests/config/tiny.yaml) in a test folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tiny_assets

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "config" / "tiny.yaml"
# jobs run the torch reference of the kernels (Triton's interpreter would only slow them down)
ENV = {**os.environ, "TRITON_INTERPRET": "0", "FDPIPE_KERNEL_BACKEND": "torch"}
# a guard against a hung run, not a speed test: the whole tiny DAG takes 3-5 minutes on 2
# idle cores and up to ~9 on a loaded machine
RUN_TIMEOUT_S = 1500


def prepare(work: Path) -> Path:
    """The inputs tiny.yaml names: a 2-layer LM (tiny/lm) and rated sentences (tiny/reviews.csv)."""
    tiny_assets.build_tiny_lm(work / "tiny" / "lm")
    tiny_assets.write_ratings_csv(work / "tiny" / "reviews.csv", n=300)
    return work


def snakemake_args(workdir, *args, configfile=TINY) -> list[str]:
    return ["-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(configfile), *args]


def snakemake(workdir, *args, configfile=TINY, check=True):
    cmd = [sys.executable, "-m", "snakemake", *snakemake_args(workdir, *args, configfile=configfile)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=RUN_TIMEOUT_S)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return out
