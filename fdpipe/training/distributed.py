"""Data parallelism: one stage in several processes, each on its share of the global batch.

A stage asked for ``processes > 1`` relaunches itself under ``torchrun`` (`relaunch`); each
process then joins the process group (`world`: ``gloo`` on CPU, ``nccl`` on CUDA) and gets a
`World` that says which share is its own and pools what must be pooled:

* every rank draws the same global batch (same seed) and keeps its slice (`World.shard`);
* each rank's loss is its share of the global-batch loss, and `World.sum_gradients` adds the
  ranks' gradients (one all-reduce over a flattened buffer), so the update equals the one a
  single process computes on the whole batch — the arithmetic of DDP, without a wrapper
  module (the stages call sub-modules and the kernels directly, which a DDP wrapper would not see);
* statistics over the batch (`World.gather`, `World.sum`) are computed on the global batch;
* only the main rank (0) writes files.

With one process `World()` does nothing at all: every call returns its input unchanged, so a
single process computes exactly what it computed before this module existed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile

import torch

from fdpipe.common.errors import ConfigError, FdpipeError
from fdpipe.common.runtime import pick_device, set_threads, setup_logging

log = logging.getLogger("fdpipe.distributed")

LOG_ENV = "FDPIPE_LOG_FILE"
RENDEZVOUS_PORT = 29500


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes of one job (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items):
        """This rank's slice of a sequence (every `size`-th item from `rank`)."""
        return items if self.size == 1 else items[self.rank::self.size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (the tensor itself when alone)."""
        if self.size == 1:
            return tensor
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors concatenated along dim 0 in rank order (sizes may differ)."""
        if self.size == 1:
            return tensor
        n = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        torch.distributed.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        torch.distributed.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in rank order."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_gradients(self, params) -> None:
        """Replace each parameter's gradient by its sum over the ranks (in place)."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def main_decides(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (for choices that must be the same everywhere, such
        as saving a state that every rank contributes to)."""
        if self.size == 1:
            return bool(flag)
        box = [bool(flag)]
        torch.distributed.broadcast_object_list(box, src=0)
        return bool(box[0])

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def _env_world() -> World:
    return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def in_launched_job() -> bool:
    """True inside a process started by torchrun (several processes)."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


@contextlib.contextmanager
def world(requested_device: str = "auto"):
    """Join the job's process group (if any); yield ``(World, device)``, leave it afterwards.

    Under torchrun each rank uses ``cuda:<local rank>`` when the device is CUDA, and the
    group's backend is ``nccl`` there and ``gloo`` on the CPU. Alone, nothing is initialised.
    """
    device = pick_device(requested_device)
    here = _env_world()
    if here.size == 1:
        yield here, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield here, device
    finally:
        torch.distributed.destroy_process_group()


def check_processes(processes, key: str) -> int:
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ConfigError(key, "an integer >= 1", processes)
    return processes


def write_spec(path, fn, kwargs: dict, processes: int) -> None:
    """The call every launched process makes: ``fn(**kwargs, processes=processes)``, as JSON
    (paths become strings)."""
    spec = {"module": fn.__module__, "function": fn.__qualname__, "kwargs": kwargs, "processes": processes}
    with open(path, "w") as fh:
        json.dump(spec, fh, default=str)


def torchrun_command(spec_path, processes: int, nodes: int = 1, endpoint: str | None = None,
                     run_id: str = "fdpipe") -> list[str]:
    """The launcher of one node for `processes` processes in all, spread over `nodes` nodes.

    One node: ``torchrun --standalone``. Several: one launcher per node, each starting
    ``processes // nodes`` processes, all meeting at the c10d rendezvous `endpoint`
    (``host:port`` of one of the nodes) under `run_id`; ranks are given out as they join.
    """
    head = [sys.executable, "-m", "torch.distributed.run"]
    entry = ["-m", "fdpipe.training.distributed", str(spec_path)]
    if nodes == 1:
        return [*head, "--standalone", f"--nproc_per_node={processes}", *entry]
    if processes % nodes:
        raise ConfigError("processes", f"a multiple of the job's {nodes} nodes", processes)
    return [*head, f"--nnodes={nodes}", f"--nproc_per_node={processes // nodes}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}", *entry]


def slurm_nodes() -> tuple[int, str | None, str]:
    """Nodes of the SLURM job this process runs in, the rendezvous endpoint on its first
    node and the job id; ``(1, None, "fdpipe")`` outside SLURM or on one node."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    if nodes <= 1:
        return 1, None, "fdpipe"
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    return nodes, f"{hosts[0]}:{RENDEZVOUS_PORT}", os.environ.get("SLURM_JOB_ID", "fdpipe")


def relaunch(fn, kwargs: dict, processes: int) -> None:
    """Run ``fn(**kwargs, processes=processes)`` in `processes` processes under torchrun and
    wait for them; raise `FdpipeError` if one fails.

    In a SLURM job that holds several nodes, ``srun`` starts one launcher per node
    (`torchrun_command`, rendezvous on the first node; the call's spec is written in the
    working directory, which a cluster shares between nodes); otherwise one launcher starts
    them all here. Each process logs to the log file of the calling process (appending) —
    rank 0 at INFO, the others warnings only — and uses its node's share of ``threads``.
    """
    log_file = next((h.baseFilename for h in logging.getLogger().handlers
                     if isinstance(h, logging.FileHandler)), "")
    nodes, endpoint, run_id = slurm_nodes()
    with tempfile.TemporaryDirectory(prefix=".fdpipe-launch-", dir=os.getcwd() if nodes > 1 else None) as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        write_spec(spec_path, fn, kwargs, processes)
        cmd = torchrun_command(spec_path, processes, nodes, endpoint, run_id)
        if nodes > 1:
            cmd = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", *cmd]
        log.info("launching %d processes of %s.%s on %d node(s)", processes, fn.__module__, fn.__qualname__, nodes)
        for handler in logging.getLogger().handlers:
            handler.flush()
        done = subprocess.run(cmd, env={**os.environ, LOG_ENV: log_file})
    if done.returncode != 0:
        raise FdpipeError(f"{fn.__module__}.{fn.__qualname__} in {processes} processes failed "
                          f"(exit code {done.returncode}); the ranks' errors are in the log above")


def _main(spec_path: str) -> None:
    """Entry point of each process started by `relaunch`."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    here = _env_world()
    setup_logging(os.environ.get(LOG_ENV) or None, level=logging.INFO if here.is_main else logging.WARNING,
                  append=True)
    kwargs = spec["kwargs"]
    on_this_node = int(os.environ.get("LOCAL_WORLD_SIZE", spec["processes"]))
    if kwargs.get("threads"):
        kwargs["threads"] = max(1, int(kwargs["threads"]) // on_this_node)
    else:
        set_threads(max(1, (os.cpu_count() or 1) // on_this_node))
    fn = getattr(importlib.import_module(spec["module"]), spec["function"])
    fn(**kwargs, processes=spec["processes"])


if __name__ == "__main__":
    _main(sys.argv[1])
