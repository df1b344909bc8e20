# f-DPG alignment: one job per entry of alignment.runs.


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
        state="results/align/{run}.state.pt",
    script:
        "../scripts/align.py"
