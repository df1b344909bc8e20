"""fdpipe: a reproducible f-divergence alignment pipeline for language models.

Layers, top to bottom (a module imports only from layers below it, or from its own
subpackage; `tests/test_layers.py` enforces it):

- `fdpipe.stages`: one module per pipeline stage (resources, base_model, data, sft, reward,
  align, evaluate, report, toy_study), each a `run(...)` function with explicit arguments;
- `fdpipe.fdpg`: the f-DPG math and loop (divergences, targets, estimators, update, aligner, toy);
- `fdpipe.models` and `fdpipe.training`: model plumbing (loading, trainable parameters, policy,
  reward model, gold scorer) and the training toolkit (resumable state, optimizer, batches);
- `fdpipe.common`: errors, config, I/O, runtime, statistics, text metrics, plots.

The Triton kernels are the separate package `fdpipe_kernels` (folder `kernels/`), which
imports nothing from fdpipe. Nothing here imports Snakemake.
"""

__version__ = "0.1.0"
