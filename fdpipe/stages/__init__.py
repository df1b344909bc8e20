"""Pipeline stages, one module per Snakemake rule family: resources, base_model, data, sft,
reward, align, evaluate, report, toy_study. Each exposes `run(...)` with keyword arguments.
Stages use every layer below them; nothing imports a stage, and no stage imports another."""
