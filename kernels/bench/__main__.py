"""`python -m fdpipe_kernels.bench`: see `fdpipe_kernels.bench.cli`."""
from .cli import main

main()
