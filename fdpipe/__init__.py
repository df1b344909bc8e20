"""fdpipe: a reproducible f-divergence alignment pipeline for language models.

Each stage is a plain function with explicit arguments (paths and a config section):
`fdpipe.data.run`, `fdpipe.sft.run`, `fdpipe.reward.run`, `fdpipe.align.run`,
`fdpipe.evaluate.run`, `fdpipe.report.run`. Nothing here imports Snakemake.
"""

__version__ = "0.1.0"
