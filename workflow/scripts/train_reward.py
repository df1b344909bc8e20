"""Rule train_reward: thin entry point around fdpipe.stages.reward.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import reward

setup_logging(snakemake.log[0])
reward.run(
    backbone=snakemake.params.backbone,
    prefs_train_path=snakemake.input.prefs_train,
    prefs_val_path=snakemake.input.prefs_val,
    ratings_path=snakemake.input.ratings,
    cfg=snakemake.params.reward,
    seed=snakemake.params.seed,
    out_dir=snakemake.output.model,
    metrics_path=snakemake.output.metrics,
    state_path=snakemake.params.state,
    device=snakemake.params.device,
    threads=snakemake.threads,
    processes=snakemake.resources.processes,
)
