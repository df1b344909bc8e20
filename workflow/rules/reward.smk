# Reward model: a scalar-head encoder trained on the preference pairs (results/reward/).
# The resumable state (params.state, results/reward/state.pt) lives outside the model
# folder, which Snakemake deletes when a job fails, so a killed job resumes instead of
# restarting; it is removed once the stage has finished.


rule train_reward:
    input:
        prefs_train="results/data/prefs_train.parquet",
        prefs_val="results/data/prefs_val.parquet",
        # held-out rated sentences: correlation with human ratings, reward mean/std
        ratings="results/data/sft_val.parquet",
    output:
        model=directory("results/reward/model"),
        metrics="results/reward/metrics.parquet",
    log:
        "logs/train_reward/train_reward.log",
    benchmark:
        "benchmarks/train_reward/train_reward.tsv"
    conda:
        "../../environment.yml"
    threads: job_threads(config["reward"]["processes"])
    resources:
        # reward.processes processes (torchrun when > 1), one GPU each unless device is cpu
        processes=config["reward"]["processes"],
        gpu=job_gpus(config["reward"]["processes"]),
        mem_mb=4000 * config["reward"]["processes"],
    params:
        reward=stage_settings(config["reward"]),
        backbone=config["models"]["reward_backbone"],
        seed=config["seed"],
        device=config["device"],
        state=get_state("reward"),
    script:
        "../scripts/train_reward.py"
