# Report: every evaluation summary and training curve in two tidy tables, with plots.


rule report:
    input:
        summaries=expand(
            "results/eval/{policy}/summary.parquet",
            policy=["sft"] + run_names(),
        ),
        metrics=expand("results/align/{run}/metrics.parquet", run=run_names()),
    output:
        summary=report(
            "results/report/summary.parquet",
            caption="../report/summary.rst",
            category="Tables",
        ),
        curves=report(
            "results/report/curves.parquet",
            caption="../report/curves_table.rst",
            category="Tables",
        ),
        frontier_png="results/report/frontier.png",
        frontier_svg=report(
            "results/report/frontier.svg",
            caption="../report/frontier.rst",
            category="Plots",
        ),
        curves_png="results/report/curves.png",
        curves_svg=report(
            "results/report/curves.svg",
            caption="../report/curves.rst",
            category="Plots",
        ),
        features_png="results/report/features.png",
        features_svg=report(
            "results/report/features.svg",
            caption="../report/features.rst",
            category="Plots",
        ),
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        report=config["report"],
        seed=config["seed"],
    script:
        "../scripts/report.py"
