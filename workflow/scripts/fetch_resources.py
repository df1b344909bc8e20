"""Rule fetch_resources: thin entry point around fdpipe.resources.run."""
import os

from fdpipe.stages import resources
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
# fetch() derives the path from resources.dir and the artifact's section
resources_cfg = {"dir": os.path.dirname(snakemake.output[0]) or ".",
                 snakemake.params.key: snakemake.params.artifact}
resources.run(resources_cfg, [snakemake.params.key], [snakemake.output[0]])
