"""The tiny DAG on a real SLURM cluster through profiles/slurm.

Where sbatch is missing (and the run is not CI) this module skips. Otherwise, as root, it
brings up the one-node cluster of .ci/slurm.sh when no cluster answers (in CI always: the
call is a no-op when the cluster is up), and runs Snakemake with a copy of profiles/slurm
whose only changes are the partition (the cluster's default, or $FDPIPE_SLURM_PARTITION)
and the account ($FDPIPE_SLURM_ACCOUNT, default `fdpipe`), plus test flags on the command
line (keep the SLURM logs, first status check after 2 s, no retries).

To keep the suite short the cluster runs the part of the DAG that ends in the evaluation of
one run (prepare_data, sft, train_reward, align rkl, evaluate sft and rkl: every rule that
trains or evaluates), and its outputs are compared with the session's local run of the same
config (conftest's `finished_run`). Cluster jobs get one thread each, the local run two;
torch's CPU reductions depend on the thread count, so floats are compared to a relative
1e-4 or an absolute 1e-5 (weights after Adam steps: 2e-4; measured at most ~1e-6 and ~5e-5
apart, and bit-identical with equal threads), everything else exactly, timing values aside.

A job that fails (an SFT job asked to run on CUDA, on the node's fake GPU) makes Snakemake
fail with the job's SLURM log path in its output; that run goes to the cluster at the same
time as the other. Every run is bounded by a timeout, and jobs left behind are cancelled
(scancel) at teardown.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tiny_dag import ENV, REPO, TINY, snakemake_args

SCRIPT = REPO / ".ci" / "slurm.sh"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
# the part of the tiny DAG that runs on the cluster, and its jobs
TARGET = "results/eval/rkl/summary.parquet"
JOBS = {"prepare_data": 1, "sft": 1, "train_reward": 1, "align": 1, "evaluate": 2}
TEST_FLAGS = ["--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "2",
              "--retries", "0", "--verbose"]
RUN_TIMEOUT_S = 600   # a run that hangs (e.g. a status command that never answers) fails


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def not_here(reason: str):
    """Skip outside CI; in CI the cluster test must run, so fail."""
    if in_ci():
        pytest.fail(f"CI must run the SLURM test: {reason}")
    pytest.skip(reason)


def default_partition() -> str | None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.split() if out.returncode == 0 else []
    return next((name.rstrip("*") for name in names if name.endswith("*")), names[0] if names else None)


@pytest.fixture(scope="module")
def partition():
    if shutil.which("sbatch") is None and not in_ci():
        pytest.skip("no SLURM here: sbatch not found (CI brings a one-node cluster up with .ci/slurm.sh up)")
    if SCRIPT.exists() and os.geteuid() == 0 and (in_ci() or default_partition() is None):
        t0 = time.perf_counter()
        up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            not_here(f".ci/slurm.sh up failed:\n{up.stdout}\n{up.stderr}")
        print(f".ci/slurm.sh up: {time.perf_counter() - t0:.1f} s")
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        not_here("snakemake-executor-plugin-slurm is not installed (the `slurm` or `test` extra)")
    name = os.environ.get("FDPIPE_SLURM_PARTITION") or default_partition()
    if not name:
        not_here("no SLURM cluster answers sinfo (as root, .ci/slurm.sh up starts one)")
    return name


def write_profile(folder: Path, partition: str) -> Path:
    """profiles/slurm with only the partition and the account changed."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"]["slurm_partition"] = partition
    profile["default-resources"]["slurm_account"] = os.environ.get("FDPIPE_SLURM_ACCOUNT", "fdpipe")
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def cancel_jobs_under(folder: Path) -> None:
    """scancel every job whose working directory is in `folder` (what a killed run left)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=30)
    ids = [line.split()[0] for line in out.stdout.splitlines()
           if len(line.split()) == 2 and line.split()[1].startswith(str(folder))]
    if ids:
        subprocess.run(["scancel", *ids], timeout=30)


def cluster_command(work: Path, profile: Path, target: str, configfile=TINY) -> list[str]:
    return [sys.executable, "-m", "snakemake", target, *snakemake_args(work, configfile=configfile),
            "--workflow-profile", str(profile), *TEST_FLAGS]


def submissions(text: str) -> list[tuple[str, Path]]:
    """(SLURM job id, its log) of every job the run submitted."""
    return [(m.group(1), Path(m.group(2)))
            for m in re.finditer(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", text)]


def sbatch_calls(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sbatch call: ")]


@pytest.fixture(scope="module")
def cluster_runs(partition, request, tmp_path_factory):
    """Two Snakemake runs on the cluster at once, each in a fresh folder with tiny/:

    * "dag": the tiny DAG up to TARGET;
    * "fails": rule sft with device cuda, on the local run's results/data (copied with their
      modification times, so nothing upstream reruns).

    Returns name -> (work folder, exit code, stdout + stderr, seconds), and "local" -> the
    local run's folder.
    """
    # asked for here, not as an argument: pytest would make the session's local run before
    # `partition` had a chance to skip
    finished_run = request.getfixturevalue("finished_run")
    base = tmp_path_factory.mktemp("slurm")
    profile = write_profile(base / "profile", partition)
    cuda = base / "cuda.yaml"
    cuda.write_text(TINY.read_text().replace("device: cpu", "device: cuda", 1))
    runs = {"dag": (TARGET, TINY), "fails": ("results/sft/model", cuda)}
    started, done = {}, {}
    try:
        for name, (target, configfile) in runs.items():
            work = base / name
            shutil.copytree(finished_run / "tiny", work / "tiny")
            if name == "fails":
                shutil.copytree(finished_run / "results" / "data", work / "results" / "data")
            log = open(base / f"{name}.out", "w+")
            proc = subprocess.Popen(cluster_command(work, profile, target, configfile), stdout=log,
                                    stderr=subprocess.STDOUT, text=True, env=ENV)
            started[name] = (work, proc, log, time.perf_counter())
        while len(done) < len(started):
            for name, (work, proc, log, t0) in started.items():
                if name in done:
                    continue
                seconds = time.perf_counter() - t0
                if proc.poll() is None and seconds > RUN_TIMEOUT_S:
                    proc.kill()
                if proc.poll() is not None:
                    log.seek(0)
                    done[name] = (work, proc.returncode, log.read(), seconds)
                    log.close()
                    print(f"SLURM run {name!r}: exit code {proc.returncode}, {seconds:.0f} s")
            time.sleep(0.5)
    finally:
        for work, proc, log, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cancel_jobs_under(base)
    for name, (_, code, text, seconds) in done.items():
        assert seconds < RUN_TIMEOUT_S, f"snakemake on SLURM ({name}) took over {RUN_TIMEOUT_S} s:\n{text[-4000:]}"
    return {**done, "local": finished_run}


@pytest.fixture(scope="module")
def cluster_run(cluster_runs):
    work, code, text, _ = cluster_runs["dag"]
    assert code == 0, f"snakemake on SLURM failed:\n{text[-8000:]}"
    return work, text


def test_every_job_went_through_sbatch(cluster_run, partition):
    work, text = cluster_run
    jobs = submissions(text)
    rules = {}
    for _, log in jobs:
        assert log.is_file(), f"no SLURM log {log}"
        rule = log.relative_to(work / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_")
        rules[rule] = rules.get(rule, 0) + 1
        assert "Finished jobid" in log.read_text(), log
    assert rules == JOBS, f"SLURM jobs per rule: {rules}"
    assert len({job_id for job_id, _ in jobs}) == len(jobs)
    calls = sbatch_calls(text)
    assert len(calls) == len(jobs)
    for call in calls:
        assert f"-p {partition}" in call and "--cpus-per-task=1" in call, call
        # tiny.yaml runs on the CPU: no GPU request at all
        assert "--gpus" not in call and "--gres" not in call, call
    # their state came from squeue (the profile's status command)
    assert "command=squeue" in text


def close(a, b, atol=1e-5) -> bool:
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-4, atol=atol, equal_nan=True)


def is_timing(name: str) -> bool:
    return name == "seconds" or name.endswith("_s")


def same_frame(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """Columns (or metrics of a tidy frame) where a and b differ, timing values aside."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return [f"shape {a.shape} {list(a.columns)} vs {b.shape} {list(b.columns)}"]
    if "metric" in a.columns:
        keep = ~a["metric"].astype(str).map(is_timing)
        if not keep.equals(~b["metric"].astype(str).map(is_timing)):
            return ["metric"]
        a, b = a[keep], b[keep]
    wrong = []
    for col in a.columns:
        if is_timing(col):
            continue
        x, y = a[col], b[col]
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            if not close(x, y):
                wrong.append(col)
        elif not x.reset_index(drop=True).equals(y.reset_index(drop=True)):
            wrong.append(col)
    return wrong


def same_json(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return close(a, b)
    return a == b


def test_outputs_equal_the_local_run(cluster_run, cluster_runs):
    from safetensors.numpy import load_file

    work, _ = cluster_run
    finished_run = cluster_runs["local"]
    files = sorted(p for p in (work / "results").rglob("*") if p.is_file())
    checked, wrong = set(), []
    for path in files:
        rel = path.relative_to(work)
        local = finished_run / rel
        assert local.is_file(), f"{rel} is not an output of the local run"
        if path.suffix == ".parquet":
            diff = same_frame(pd.read_parquet(path), pd.read_parquet(local))
        elif path.suffix == ".safetensors":
            x, y = load_file(path), load_file(local)
            # Adam turns tiny gradient differences into steps of up to lr: ~5e-5 measured
            diff = [] if x.keys() == y.keys() and all(close(x[k], y[k], atol=2e-4) for k in x) else ["weights"]
        elif path.suffix == ".json":
            diff = [] if same_json(json.loads(path.read_text()), json.loads(local.read_text())) else ["json"]
        else:
            diff = [] if path.read_bytes() == local.read_bytes() else ["bytes"]
        if diff:
            wrong.append(f"{rel}: {diff}")
        checked.add(rel.parts[1])
    assert not wrong, "cluster outputs differ from the local run:\n" + "\n".join(wrong)
    assert checked == {"data", "sft", "reward", "align", "eval"}
    assert any(p.suffix == ".safetensors" for p in files)


def test_a_failing_job_fails_the_run_with_its_slurm_log(cluster_runs):
    """SFT asked to run on CUDA: the job gets the node's (fake) GPU through --gpus, fails to
    load the model there, and Snakemake stops naming the job's SLURM log."""
    work, code, text, _ = cluster_runs["fails"]
    assert code != 0, text[-4000:]
    jobs = submissions(text)
    assert len(jobs) == 1, text[-4000:]
    job_id, log = jobs[0]
    assert log.is_file() and log.parent.name == "rule_sft", log
    assert "Torch not compiled with CUDA enabled" in log.read_text()
    # the error names the job's SLURM log
    message = f"SLURM-job '{job_id}' failed"
    assert message in text, text[-4000:]
    assert str(log) in text[text.index(message):], text[-4000:]
    # the GPU went through the plugin's gpu resource, not slurm_extra
    (call,) = sbatch_calls(text)
    assert "--gpus=1" in call and "--gres" not in call, call
    assert not (work / "results" / "sft" / "model").exists()
