"""Kill a real Snakemake run anywhere (SIGKILL to the whole process tree), recover with the one
documented command, and get exactly the outputs of an uninterrupted run.

The tiny DAG (whose config writes resume states after every step) is killed once while `sft`
holds its state (the run asked for data → sft) and once while the `align` job of run rkl holds
its state (in a folder that already holds the uninterrupted run's data, SFT model and reward
model, copied with their modification times and Snakemake's records, so that only align runs).
`python workflow/run.py ...` (the README's recovery command) releases the stale lock, reruns
the incomplete job, which resumes from its state, and finishes the run; its outputs must equal
those of the uninterrupted whole-DAG run of tests/test_workflow.py (same config, same seed).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tiny_dag import ENV, REPO, RUN_TIMEOUT_S, prepare, snakemake_args

TARGET = "results/align/rkl/metrics.parquet"
TIMING = ("seconds", "tokens_per_s", "elapsed_s")
# what each killed run asks for, and what it finds done already (copied from the finished run)
CASES = {"sft": ("results/sft/metrics.parquet", []),
         "align": (TARGET, ["results/data", "results/sft", "results/reward", ".snakemake/metadata"])}


def _prepare(work: Path, target: str = TARGET) -> list[str]:
    return snakemake_args(prepare(work), "--cores", "2", target)


def _seed(work: Path, finished: Path, parts: list[str]) -> None:
    """`work` with tiny/ and `parts` of the finished run, modification times kept."""
    for part in ["tiny", *parts]:
        shutil.copytree(finished / part, work / part)


def _recover(args) -> subprocess.CompletedProcess:
    """The README's recovery command."""
    return subprocess.run([sys.executable, str(REPO / "workflow" / "run.py"), *args], env=ENV,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _kill_when(args, state: Path, timeout: float = 300.0) -> None:
    """Start snakemake in its own process group; SIGKILL the group once `state` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not state.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run ended (or timed out) before {state} appeared")
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _outputs(work: Path, only=None) -> dict:
    """Every output under results/ (or those named in `only`): Parquet tables without timing
    columns, other files by digest."""
    out = {}
    for path in sorted((work / "results").rglob("*")):
        if only is not None and str(path.relative_to(work)) not in only:
            continue
        if not path.is_file() or path.name.startswith(".snakemake"):
            continue
        rel = str(path.relative_to(work))
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
            df = df.drop(columns=[c for c in df.columns if c.startswith("time_")])
            if "metric" in df.columns:
                df = df[~df["metric"].isin(TIMING)]
            out[rel] = df.reset_index(drop=True)
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _assert_same_outputs(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(got[name], value, check_exact=True, obj=name)
        else:
            assert got[name] == value, name


@pytest.mark.parametrize("stage, state, log", [
    ("sft", "results/sft/state.pt", "logs/sft/sft.log"),
    ("align", "results/align/rkl/state.pt", "logs/align/rkl.log"),
])
def test_killed_run_recovers_to_the_uninterrupted_outputs(finished_run, tmp_path, stage, state, log):
    target, done = CASES[stage]
    _seed(tmp_path, finished_run, done)
    args = snakemake_args(tmp_path, "--cores", "2", target)
    _kill_when(args, tmp_path / state)
    assert (tmp_path / state).exists()
    assert any((tmp_path / ".snakemake" / "locks").iterdir())          # the kill left the lock behind
    plain = subprocess.run([sys.executable, "-m", "snakemake", *args], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode != 0 and "cannot be locked" in plain.stdout + plain.stderr   # what users met
    recovered = _recover(args)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert "removing the lock a killed run left" in recovered.stderr
    assert "resumed" in (tmp_path / log).read_text()
    assert not (tmp_path / state).exists()
    recovered_outputs = _outputs(tmp_path)
    assert {"results/sft/model/model.safetensors", target} <= set(recovered_outputs)
    if stage == "align":                                  # nothing upstream ran again
        assert not (tmp_path / "logs" / "sft").exists() and not (tmp_path / "logs" / "train_reward").exists()
    _assert_same_outputs(recovered_outputs, _outputs(finished_run, only=set(recovered_outputs)))


def test_recovery_refuses_while_snakemake_runs(tmp_path):
    args = _prepare(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not any((tmp_path / ".snakemake" / "locks").glob("*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        refused = _recover(args)
        assert refused.returncode == 1 and f"snakemake is running here (process {proc.pid}" in refused.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
