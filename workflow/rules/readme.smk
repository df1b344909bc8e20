# The README's tables of this run (seconds per job, training, held-out results), written as
# Markdown from the run's outputs. Not part of `rule all`: ask for it by name,
# `snakemake --cores all results/report/readme_tables.md`, after a run.


rule readme_tables:
    input:
        summary="results/report/summary.parquet",
        sft="results/sft/metrics.parquet",
        reward="results/reward/metrics.parquet",
    output:
        "results/report/readme_tables.md",
    log:
        "logs/readme_tables/readme_tables.log",
    benchmark:
        "benchmarks/readme_tables/readme_tables.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        benchmarks="benchmarks",
    script:
        "../scripts/readme_tables.py"
