"""Rule readme_tables: thin entry point around fdpipe.stages.readme_tables.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import readme_tables

setup_logging(snakemake.log[0])
readme_tables.run(
    summary_path=snakemake.input.summary,
    sft_metrics_path=snakemake.input.sft,
    reward_metrics_path=snakemake.input.reward,
    benchmark_dir=snakemake.params.benchmarks,
    out_path=snakemake.output[0],
)
