"""Rule fetch_resources: thin entry point around fdpipe.stages.resources.run."""
import os

from fdpipe.common.runtime import setup_logging
from fdpipe.stages import resources

setup_logging(snakemake.log[0])
resources.run(
    # fetch() derives the path from resources.dir and the artifact's section
    resources_cfg={
        "dir": os.path.dirname(snakemake.output[0]) or ".",
        snakemake.params.key: snakemake.params.artifact,
    },
    keys=[snakemake.params.key],
    outputs=[snakemake.output[0]],
)
