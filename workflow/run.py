"""`snakemake` that recovers by itself after a crash: `python workflow/run.py --cores all`.

A Snakemake killed without warning (SIGKILL, an out-of-memory kill, a preempted node) leaves
its lock behind, and the next `snakemake` in the folder refuses to start until someone runs
`snakemake --unlock`. This wrapper does that for you, and only when it is safe:

1. it takes an exclusive lock on `.snakemake/fdpipe-run.lock` for as long as it runs (the
   operating system releases it when the process dies, however it dies), so two wrappers in
   one folder never run at once;
2. it looks for a live `snakemake` process working in the folder (started by hand, say) and
   refuses, naming its process id, if there is one;
3. only then, if Snakemake's lock directory is not empty, the lock is stale: it runs
   `snakemake --unlock` with the same arguments;
4. it runs `snakemake` with your arguments and exits with its exit code.

Incomplete outputs are rerun (`rerun-incomplete` in profiles/default) and the training stages
resume from their saved states, so the rerun finishes the work of the killed one.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path


def workdir(args: list[str]) -> Path:
    """The folder Snakemake works in: `-d/--directory`, else the current one."""
    for i, arg in enumerate(args):
        if arg in ("-d", "--directory") and i + 1 < len(args):
            return Path(args[i + 1]).resolve()
        if arg.startswith("--directory="):
            return Path(arg.split("=", 1)[1]).resolve()
    return Path.cwd().resolve()


def live_snakemake(folder: Path) -> list[int]:
    """Process ids of running `snakemake` commands whose working directory is `folder`
    (Linux /proc; elsewhere none can be seen and the list is empty)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd")).resolve()
        except OSError:      # gone meanwhile, or not ours to read
            continue
        if cwd == folder and any(part.endswith(b"snakemake") or part == b"snakemake" for part in cmdline[:3]):
            found.append(int(proc.name))
    return found


def main(args: list[str]) -> int:
    folder = workdir(args)
    state_dir = folder / ".snakemake"
    state_dir.mkdir(parents=True, exist_ok=True)
    guard = open(state_dir / "fdpipe-run.lock", "w")
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{folder}: another `python workflow/run.py` is running here; wait for it to finish", file=sys.stderr)
        return 1
    alive = live_snakemake(folder)
    if alive:
        print(f"{folder}: snakemake is running here (process {', '.join(map(str, alive))}); "
              "wait for it or stop it first", file=sys.stderr)
        return 1
    snakemake = [sys.executable, "-m", "snakemake"]
    locks = state_dir / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        print(f"{folder}: no snakemake is running here; removing the lock a killed run left", file=sys.stderr)
        subprocess.run([*snakemake, *args, "--unlock"], check=True)
    return subprocess.run([*snakemake, *args]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
