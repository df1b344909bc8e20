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
    # the longest jobs start first: an align job left waiting behind evaluations
    # lengthens the whole run (the last one ran alone after them in the default run)
    priority: 1
    conda:
        "../../environment.yml"
    threads: lambda wc: side_by_side_threads(run_processes(wc.run), len(run_names()))
    resources:
        # the run's processes (torchrun when > 1), one GPU each unless device is cpu
        processes=lambda wc: run_processes(wc.run),
        gpu=lambda wc: job_gpus(run_processes(wc.run)),
        mem_mb=lambda wc: 8000 * run_processes(wc.run),
    params:
        run_cfg=lambda wc: run_config(wc.run),
        seed=config["seed"],
        device=config["device"],
        state=get_state("align", "run"),
    script:
        "../scripts/align.py"
