# The exact toy study (docs/toy_study.md): every generator of toy.divergences trained on every
# target kind of an enumerable space with the alignment stage's Aligner, measured exactly.
# One job per generator (toy_train), then the merged table and its figure (toy_study).


rule toy_train:
    output:
        part="results/toy/runs/{divergence}.parquet",
    log:
        "logs/toy_train/{divergence}.log",
    benchmark:
        "benchmarks/toy_train/{divergence}.tsv"
    wildcard_constraints:
        divergence="|".join(config["toy"]["divergences"]),
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        toy=config["toy"],
        seed=config["seed"],
    script:
        "../scripts/toy_study.py"


rule toy_study:
    input:
        parts=expand(
            "results/toy/runs/{divergence}.parquet",
            divergence=config["toy"]["divergences"],
        ),
    output:
        curves=report(
            "results/toy/curves.parquet",
            caption="../report/toy_curves.rst",
            category="Toy study",
        ),
        png="results/toy/divergence_vs_step.png",
        svg=report(
            "results/toy/divergence_vs_step.svg",
            caption="../report/toy_divergence_vs_step.rst",
            category="Toy study",
        ),
    log:
        "logs/toy_study/toy_study.log",
    benchmark:
        "benchmarks/toy_study/toy_study.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        toy=config["toy"],
        seed=config["seed"],
    script:
        "../scripts/toy_study.py"
