"""Rule evaluate: thin entry point around fdpipe.stages.evaluate.run."""
from fdpipe.common.runtime import setup_logging
from fdpipe.stages import evaluate

setup_logging(snakemake.log[0])
# an aligned run's [policy model, target.json, SFT samples] and its divergence/target
# settings; both empty for sft
policy_model, target, sft_samples = snakemake.input.aligned or (None, None, None)
run_params = snakemake.params.run or {}
evaluate.run(
    policy=snakemake.wildcards.policy,
    policy_model=policy_model,
    sft_model=snakemake.input.sft,
    reward_model=snakemake.input.reward,
    prompts_path=snakemake.input.prompts,
    samples_path=snakemake.output.samples,
    summary_path=snakemake.output.summary,
    cfg=snakemake.params.evaluation,
    seed=snakemake.params.seed,
    divergence=run_params.get("divergence"),
    target_path=target,
    sft_samples_path=sft_samples,
    device=snakemake.params.device,
    threads=snakemake.threads,
    config={"evaluation": snakemake.params.evaluation, "seed": snakemake.params.seed, "run": run_params},
)
