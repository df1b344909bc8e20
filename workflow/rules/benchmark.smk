# Kernel benchmark (results/bench/kernels.parquet): fdpipe's ops against eager torch,
# torch.compile and Liger-Kernel. The full grid runs on a CUDA device; without one a smoke
# grid checks the harness in seconds. Not part of `rule all`: ask for it by name,
# `snakemake --cores all benchmark_kernels`.


rule benchmark_kernels:
    output:
        table="results/bench/kernels.parquet",
        markdown="results/bench/kernels.md",
    log:
        "logs/benchmark_kernels/benchmark_kernels.log",
    benchmark:
        "benchmarks/benchmark_kernels/benchmark_kernels.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=4000,
    params:
        bench=config["benchmark"],
    script:
        "../scripts/benchmark_kernels.py"
