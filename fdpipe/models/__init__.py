"""Model plumbing: causal LM loading and saving, which parameters train, the sampling and
scoring policy, the proxy reward model and the gold scorer. Uses `fdpipe.common` and the
kernels package."""
