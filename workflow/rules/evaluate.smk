# Evaluation: every policy (`sft` and each alignment run) on the held-out prompts.
# An aligned policy also reads its run's target.json and the SFT samples (for the SFT
# model's divergences to that target), so the SFT evaluation never depends on a run.


rule evaluate:
    input:
        sft="results/sft/model",
        reward="results/reward/model",
        prompts="results/data/prompts_eval.parquet",
        # [policy model, target.json, SFT samples] of an aligned run; empty for sft
        aligned=lambda wc: (
            []
            if wc.policy == "sft"
            else [
                f"results/align/{wc.policy}/model",
                f"results/align/{wc.policy}/target.json",
                "results/eval/sft/samples.parquet",
            ]
        ),
    output:
        samples="results/eval/{policy}/samples.parquet",
        summary="results/eval/{policy}/summary.parquet",
    log:
        "logs/evaluate/{policy}.log",
    benchmark:
        "benchmarks/evaluate/{policy}.tsv"
    wildcard_constraints:
        policy="|".join(["sft"] + run_names()),
    conda:
        "../../environment.yml"
    threads: side_by_side_threads(1, len(run_names()) + 1)
    resources:
        # one process; a GPU unless device is cpu
        gpu=job_gpus(),
        mem_mb=6000,
    params:
        evaluation=stage_settings(config["evaluation"]),
        seed=config["seed"],
        device=config["device"],
        # the part of the run's config that its evaluation reads (empty for sft)
        run=lambda wc: (
            {}
            if wc.policy == "sft"
            else {
                key: value
                for key, value in run_config(wc.policy).items()
                if key in ("divergence", "target")
            }
        ),
    script:
        "../scripts/evaluate.py"
