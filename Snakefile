# fdpipe: data -> SFT -> reward model -> f-DPG alignment -> evaluation -> reports.
# `snakemake --cores all` runs everything with config/config.yaml; see README.md.
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sft.smk"
include: "workflow/rules/reward.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/readme.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
