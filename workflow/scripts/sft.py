"""Rule sft: thin entry point around fdpipe.sft.run."""
import os

from fdpipe.stages import sft
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
model_dir = snakemake.output.model
sft.run(
    snakemake.input.get("base", snakemake.params.base),
    snakemake.input.train,
    snakemake.input.val,
    snakemake.params.sft,
    snakemake.params.seed,
    model_dir,
    snakemake.output.metrics,
    os.path.join(os.path.dirname(os.path.normpath(model_dir)), "state.pt"),
    device=snakemake.params.device,
    threads=snakemake.threads,
)
