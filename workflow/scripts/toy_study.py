"""Rules toy_train and toy_study: thin entry point around fdpipe.stages.toy_study."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import toy_study

setup_logging(snakemake.log[0])
if snakemake.rule == "toy_train":
    toy_study.run_part(
        cfg=snakemake.params.toy,
        seed=snakemake.params.seed,
        divergence_names=[snakemake.wildcards.divergence],
        out_part=snakemake.output.part,
        threads=snakemake.threads,
    )
else:
    # the SVG is written beside the PNG
    toy_study.run(
        cfg=snakemake.params.toy,
        seed=snakemake.params.seed,
        out_curves=snakemake.output.curves,
        out_plot=snakemake.output.png,
        parts=snakemake.input.parts,
        threads=snakemake.threads,
    )
