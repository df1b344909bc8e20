# Config validation, shared helpers and wildcard constraints.
import os
import sys

from fdpipe.common import config as config_checks
from fdpipe.common.config import merged_run_config
from fdpipe.common.errors import FdpipeError


def config_sources():
    """Where the config came from: its files, and --config when given."""
    files = [str(path) for path in workflow.configfiles]
    if workflow.config_settings.config:
        files.append("--config")
    return ", ".join(files)


# Fills in the schema's defaults; a bad value stops the run here with one line naming the
# key and where the config came from (no traceback).
try:
    config_checks.validate_config(
        config,
        os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"),
    )
except FdpipeError as error:
    sys.exit(f"{error} (config from {config_sources()})")


def run_names():
    """Names of the alignment runs: alignment.select when given, else every alignment.runs entry."""
    return config_checks.run_names(config["alignment"])


def run_config(run):
    """alignment.defaults merged with alignment.runs.<run>, less `processes`: everything
    one align job computes with (its params)."""
    return stage_settings(merged_run_config(config["alignment"], run))


def run_processes(run):
    """Processes of run <run>'s align job (alignment.defaults/runs.<run>.processes)."""
    return merged_run_config(config["alignment"], run)["processes"]


def get_state(stage, *wildcards):
    """Resumable training state of a stage: results/<stage>/[{wildcard}/]state.pt.

    get_state("sft") is results/sft/state.pt; get_state("align", "run") is
    results/align/{run}/state.pt. The state sits beside the stage's directory() model
    output, not in it: Snakemake deletes a failed job's outputs, so a killed job resumes
    from here instead of restarting. The stage removes it once its outputs are written.
    """
    parts = ["results", stage, *(f"{{{name}}}" for name in wildcards), "state.pt"]
    return "/".join(parts)


def get_final_output():
    return [
        "results/report/summary.parquet",
        "results/report/curves.parquet",
        "results/report/frontier.png",
        "results/report/curves.png",
    ]


# How a training job runs: its process count is a resource, not a param. Rules sft,
# train_reward and align declare `resources: processes=N` (their script passes it to the
# stage, which runs N data-parallel processes under torchrun when N > 1), with the matching
# request: `gpu=N` when config device is not cpu (one GPU per process; `auto` asks for GPUs
# too, since on a cluster a job only sees the GPUs it requested), and at least N threads,
# i.e. CPU cores (one per process at least). Keeping `processes` out of params means that
# changing it does not rerun a finished job: it changes how a result is computed, not what.


def stage_settings(section):
    """A config section without its `processes` key, its `precision` resolved (null: the
    top-level precision): the stage's settings."""
    settings = {key: value for key, value in section.items() if key != "processes"}
    if "precision" in settings and settings["precision"] is None:
        settings["precision"] = config["precision"]
    return settings


def job_gpus(processes=1):
    """GPUs a job of `processes` processes requests: one each, none when device is cpu."""
    return 0 if config["device"] == "cpu" else processes


def job_threads(processes=1):
    """Threads (CPU cores) of a job whose stage uses all it is given: at least one per process.

    A local run gives such a job all of --cores. A cluster run (an executor such as slurm,
    without --cores) gives it one core per process, and the Snakemake that runs the job
    inside its allocation (exec mode remote) says the same, so that the job runs with what
    it requested; the cluster profile's set-threads raise it per rule.
    """
    cores = workflow.resource_settings.cores
    if workflow.remote_exec or cores is None or cores >= sys.maxsize:
        return processes
    return max(cores, processes)


def side_by_side_threads(processes=1, jobs=1):
    """Threads of a job that runs beside `jobs - 1` others of its rule (the align runs, the
    evaluated policies): a local run splits --cores between them, at least one per process,
    so that on 2 cores two one-thread align jobs run at once (measured faster than one
    two-thread job after the other: README, "Time to result"). A cluster run asks for one
    core per process, as job_threads does.
    """
    cores = workflow.resource_settings.cores
    if workflow.remote_exec or cores is None or cores >= sys.maxsize:
        return processes
    return max(cores // max(jobs, 1), processes)


wildcard_constraints:
    run="|".join(run_names()),
