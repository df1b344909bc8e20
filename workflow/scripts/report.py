"""Rule report: thin entry point around fdpipe.report.run."""
from fdpipe.stages import report
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
report.run(
    snakemake.input.summaries,
    snakemake.input.metrics,
    snakemake.output.summary,
    snakemake.output.curves,
    snakemake.output.frontier_png,
    snakemake.output.frontier_svg,
    snakemake.output.curves_png,
    snakemake.output.curves_svg,
    snakemake.params.report,
    config={"report": snakemake.params.report, "seed": snakemake.params.seed},
    seed=snakemake.params.seed,
)
