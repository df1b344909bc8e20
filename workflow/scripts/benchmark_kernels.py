"""Rule benchmark_kernels: thin entry point around fdpipe_kernels.bench."""
import torch

from fdpipe.common.runtime import setup_logging
from fdpipe_kernels import bench

setup_logging(snakemake.log[0])
cuda = torch.cuda.is_available()
settings = bench.settings_from_config(snakemake.params.bench, cuda)
table, facts = bench.run(settings, "cuda" if cuda else "cpu")
bench.write_results(table, facts, snakemake.output.table, snakemake.output.markdown, config=snakemake.params.bench)
