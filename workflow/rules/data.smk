# Data: rated sentences -> SFT examples, preference pairs and prompts (results/data/).
from fdpipe.stages.resources import data_source_input


rule prepare_data:
    input:
        # the vaderSentiment sdist (embedded), the local file, or nothing (hf:)
        unpack(lambda wc: data_source_input(config)),
    output:
        sft_train="results/data/sft_train.parquet",
        sft_val="results/data/sft_val.parquet",
        prefs_train="results/data/prefs_train.parquet",
        prefs_val="results/data/prefs_val.parquet",
        prompts_train="results/data/prompts_train.parquet",
        prompts_eval="results/data/prompts_eval.parquet",
    log:
        "logs/prepare_data/prepare_data.log",
    benchmark:
        "benchmarks/prepare_data/prepare_data.tsv"
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        data=config["data"],
        seed=config["seed"],
    script:
        "../scripts/prepare_data.py"
