"""Rule prepare_data: thin entry point around fdpipe.data.run."""
from fdpipe.stages import data
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
data.run(
    snakemake.params.data,
    snakemake.params.seed,
    snakemake.input.get("source"),
    {name: snakemake.output[name] for name in data.OUTPUTS},
)
