# Config validation, shared helpers and wildcard constraints.
import os

from fdpipe.common.config import merged_run_config, validate_config

# Fills in the schema's defaults; a bad value stops here with one line naming the key.
validate_config(
    config, os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml")
)


def run_names():
    """Names of the alignment runs (alignment.runs)."""
    return list(config["alignment"]["runs"])


def run_config(run):
    """alignment.defaults merged with alignment.runs.<run>: everything one align job reads."""
    return merged_run_config(config["alignment"], run)


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


wildcard_constraints:
    run="|".join(run_names()),
