"""Rule sft: thin entry point around fdpipe.stages.sft.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import sft

setup_logging(snakemake.log[0])
sft.run(
    # the base model folder when the rule has one, else the configured HF name
    model_path=snakemake.input.get("base", snakemake.params.base),
    train_path=snakemake.input.train,
    val_path=snakemake.input.val,
    cfg=snakemake.params.sft,
    seed=snakemake.params.seed,
    out_dir=snakemake.output.model,
    metrics_path=snakemake.output.metrics,
    state_path=snakemake.params.state,
    device=snakemake.params.device,
    threads=snakemake.threads,
    processes=snakemake.resources.processes,
)
