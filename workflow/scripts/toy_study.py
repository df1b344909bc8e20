"""Rules toy_train and toy_study: thin entry point around fdpipe.toy_study."""
from fdpipe.stages import toy_study
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
if snakemake.rule == "toy_train":
    toy_study.run_part(
        snakemake.params.toy,
        snakemake.params.seed,
        [snakemake.wildcards.divergence],
        snakemake.output.part,
        threads=snakemake.threads,
    )
else:
    toy_study.run(
        snakemake.params.toy,
        snakemake.params.seed,
        snakemake.output.curves,
        snakemake.output.png,
        parts=snakemake.input.parts,
        threads=snakemake.threads,
    )
