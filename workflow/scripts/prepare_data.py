"""Rule prepare_data: thin entry point around fdpipe.stages.data.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import data

setup_logging(snakemake.log[0])
data.run(
    data_cfg=snakemake.params.data,
    seed=snakemake.params.seed,
    # the vaderSentiment sdist or the local file; None for an hf: source
    source_path=snakemake.input.get("source"),
    outputs={name: snakemake.output[name] for name in data.OUTPUTS},
)
