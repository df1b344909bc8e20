"""Rule train_reward: thin entry point around fdpipe.reward.run."""
from fdpipe.stages import reward
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
reward.run(
    snakemake.params.backbone,
    snakemake.input.prefs_train,
    snakemake.input.prefs_val,
    snakemake.input.ratings,
    snakemake.params.reward,
    snakemake.params.seed,
    snakemake.output.model,
    snakemake.output.metrics,
    snakemake.params.state,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
