"""Rule report: thin entry point around fdpipe.stages.report.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import report

setup_logging(snakemake.log[0])
report.run(
    summary_paths=snakemake.input.summaries,
    metrics_paths=snakemake.input.metrics,
    summary_out=snakemake.output.summary,
    curves_out=snakemake.output.curves,
    frontier_png=snakemake.output.frontier_png,
    frontier_svg=snakemake.output.frontier_svg,
    curves_png=snakemake.output.curves_png,
    curves_svg=snakemake.output.curves_svg,
    features_png=snakemake.output.features_png,
    features_svg=snakemake.output.features_svg,
    cfg=snakemake.params.report,
    config={"report": snakemake.params.report, "seed": snakemake.params.seed},
    seed=snakemake.params.seed,
)
