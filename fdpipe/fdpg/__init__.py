"""The f-DPG core: f-divergences, targets, estimators of Z and of divergences, the update
(pseudo-rewards, baselines, surrogate loss), the `Aligner` loop and the exact toy space.
Uses the model plumbing (`fdpipe.models`, `fdpipe.training`) and `fdpipe.common`."""
