"""Rule evaluate: thin entry point around fdpipe.evaluate.run."""
from fdpipe.stages import evaluate
from fdpipe.common.runtime import setup_logging

setup_logging(snakemake.log[0])
run_params = snakemake.params.run or {}
# an aligned run's [policy model, target.json, SFT samples]; empty for sft
policy_model, target, sft_samples = snakemake.input.aligned or (None, None, None)
evaluate.run(
    snakemake.wildcards.policy,
    policy_model,
    snakemake.input.sft,
    snakemake.input.reward,
    snakemake.input.prompts,
    snakemake.output.samples,
    snakemake.output.summary,
    snakemake.params.evaluation,
    snakemake.params.seed,
    divergence=run_params.get("divergence"),
    target_path=target,
    sft_samples_path=sft_samples,
    device=snakemake.params.device,
    threads=snakemake.threads,
    config={"evaluation": snakemake.params.evaluation, "seed": snakemake.params.seed, "run": run_params},
)
