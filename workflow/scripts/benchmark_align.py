"""Rule benchmark_align: thin entry point around fdpipe.stages.align_bench.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import align_bench

setup_logging(snakemake.log[0])
align_bench.run(
    model_path=snakemake.input.sft,
    reward_path=snakemake.input.reward,
    prompts_path=snakemake.input.prompts,
    out_table=snakemake.output.table,
    out_markdown=snakemake.output.markdown,
    cfg=snakemake.params.bench,
    seed=snakemake.params.seed,
    threads=snakemake.threads,
)
