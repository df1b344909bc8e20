# f-DPG alignment: one job per entry of alignment.runs (results/align/{run}/).
# The resumable state (params.state, results/align/{run}/state.pt) lives outside the
# model folder, which Snakemake deletes when a job fails, so a killed job resumes
# instead of restarting; it is removed once the stage has finished.


rule align:
    input:
        sft="results/sft/model",
        reward="results/reward/model",
        prompts="results/data/prompts_train.parquet",
    output:
        model=directory("results/align/{run}/model"),
        metrics="results/align/{run}/metrics.parquet",
        target="results/align/{run}/target.json",
    log:
        "logs/align/{run}.log",
    benchmark:
        "benchmarks/align/{run}.tsv"
    conda:
        "../../environment.yml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
    params:
        run_cfg=lambda wc: run_config(wc.run),
        seed=config["seed"],
        device=config["device"],
        state=get_state("align", "run"),
    script:
        "../scripts/align.py"
