"""Rule align: thin entry point around fdpipe.stages.align.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import align

setup_logging(snakemake.log[0])
align.run(
    sft_model=snakemake.input.sft,
    reward_model=snakemake.input.reward,
    prompts_path=snakemake.input.prompts,
    run_name=snakemake.wildcards.run,
    run_cfg=snakemake.params.run_cfg,
    seed=snakemake.params.seed,
    out_model=snakemake.output.model,
    out_metrics=snakemake.output.metrics,
    out_target=snakemake.output.target,
    state_path=snakemake.params.state,
    device=snakemake.params.device,
    threads=snakemake.threads,
    processes=snakemake.resources.processes,
)
