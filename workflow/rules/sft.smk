# Supervised fine-tuning of the base model on the review sentences (results/sft/).
# The resumable state (params.state, results/sft/state.pt) lives outside the model
# folder, which Snakemake deletes when a job fails, so a killed job resumes instead of
# restarting; it is removed once the stage has finished.
from fdpipe.stages.resources import sft_base_input


rule sft:
    input:
        # the base model folder (embedded or a local path); nothing for an HF name
        unpack(lambda wc: sft_base_input(config)),
        train="results/data/sft_train.parquet",
        val="results/data/sft_val.parquet",
    output:
        model=directory("results/sft/model"),
        metrics="results/sft/metrics.parquet",
    log:
        "logs/sft/sft.log",
    benchmark:
        "benchmarks/sft/sft.tsv"
    conda:
        "../../environment.yml"
    threads: job_threads(config["sft"]["processes"])
    resources:
        # sft.processes processes (torchrun when > 1), one GPU each unless device is cpu
        processes=config["sft"]["processes"],
        gpu=job_gpus(config["sft"]["processes"]),
        mem_mb=6000 * config["sft"]["processes"],
    params:
        sft=stage_settings(config["sft"]),
        base=config["models"]["base"],
        seed=config["seed"],
        device=config["device"],
        state=get_state("sft"),
    script:
        "../scripts/sft.py"
