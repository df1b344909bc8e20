"""Pipeline stages, one module per Snakemake rule family: resources, base_model, data, sft,
reward, align, evaluate, report, toy_study. Each exposes `run(...)` with explicit arguments
(paths and a config section), which the rule's script calls with keyword arguments (the
training stages accept nothing else). Stages use every layer below them; nothing imports a
stage, and no stage imports another."""
