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


# Alignment throughput (results/bench/align.parquet, align.md): one f-DPG step of the align
# stage against the same step with full forwards and TRL's RLOOTrainer (skipped without trl)
# on the SFT model; settings in config `align_bench`. Not part of `rule all`:
# `snakemake --cores all benchmark_align`.


rule benchmark_align:
    input:
        sft="results/sft/model",
        reward="results/reward/model",
        prompts="results/data/prompts_train.parquet",
    output:
        table="results/bench/align.parquet",
        markdown="results/bench/align.md",
    log:
        "logs/benchmark_align/benchmark_align.log",
    benchmark:
        "benchmarks/benchmark_align/benchmark_align.tsv"
    conda:
        "../../environment.yml"
    threads: job_threads()
    resources:
        mem_mb=8000,
    params:
        bench=config["align_bench"],
        seed=config["seed"],
    script:
        "../scripts/benchmark_align.py"
