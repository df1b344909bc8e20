"""Monte-Carlo estimators against exact values on the toy space.

Statistical checks use fixed seeds and state their confidence: a two-sided z-test at 99.9%
family-wise, Bonferroni-corrected over the comparisons in the test. Calibration checks
repeat an estimate over independent seeds and require the mean squared z-score to lie in
the 99.9% (Bonferroni) band of a χ² distribution, so a standard error that is off by a
factor of two fails.
"""
import math
from statistics import NormalDist

import pytest
import torch

from fdpipe.fdpg import divergences, estimators, toy
from fdpipe.fdpg.targets import Target


def z_bound(confidence: float, comparisons: int) -> float:
    """Two-sided z quantile for a family-wise `confidence` over `comparisons` tests."""
    return NormalDist().inv_cdf(1 - (1 - confidence) / (2 * comparisons))


def chi2_band(dof: int, confidence: float, comparisons: int) -> tuple[float, float]:
    """Two-sided χ² quantiles (Wilson–Hilferty) for a family-wise `confidence`."""
    z = z_bound(confidence, comparisons)
    q = lambda s: dof * (1 - 2 / (9 * dof) + s * math.sqrt(2 / (9 * dof))) ** 3
    return q(-z), q(z)


SPACE = toy.ToySpace(3, 2, 3)


def problem(kind, **kw):
    return toy.build_problem(SPACE, Target(kind, **kw), model_seed=0, reward_seed=1)


def perturbed_policy(scale=0.7, seed=9):
    model = SPACE.make_model(seed=0)
    with torch.no_grad():
        model.table.add_(scale * torch.randn(model.table.shape, generator=torch.Generator().manual_seed(seed)))
    return toy.make_policy(model)


def sampled_terms(prob, policy, proposal, n, seed):
    """Samples of `proposal` with log π, log P, log q, prompt groups."""
    samples = proposal.sample(prob.prompt_tokens(), n, generator=torch.Generator().manual_seed(seed))
    log_pi = policy.score(samples).logprobs.detach().double()
    log_target = prob.base.score(samples).logprobs.double() + prob.target.log_potential(prob.reward(samples))
    return samples, log_pi, log_target, samples.sample_logprobs.double()


# ---------------------------------------------------------------- grouping helpers

def test_group_logsumexp_and_log_partition():
    values = torch.tensor([0.0, 1.0, -math.inf, 2.0, 3.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1, 1])
    out = estimators.group_logsumexp(values, group, 3)
    torch.testing.assert_close(out[:2], torch.stack([torch.logsumexp(values[:2], 0), torch.logsumexp(values[2:], 0)]))
    assert out[2].item() == -math.inf                            # empty group
    torch.testing.assert_close(estimators.log_partition(values, group, 2), out[:2] - torch.log(torch.tensor([2.0, 3.0])).double())


def test_running_log_z_pools_every_batch_of_a_prompt():
    running = estimators.RunningLogZ()
    first = torch.log(torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64))
    running.update(["a", "a", "b"], first)
    pooled = running.update(["a", "b"], torch.log(torch.tensor([5.0, 20.0], dtype=torch.float64)))
    torch.testing.assert_close(pooled, torch.log(torch.tensor([3.0, 15.0], dtype=torch.float64)))
    restored = estimators.RunningLogZ()
    restored.load_state_dict(running.state_dict())
    assert restored.log_z("a") == pytest.approx(math.log(3.0)) and len(restored) == 2


# ---------------------------------------------------------------- log Z

@pytest.mark.parametrize("kind, kw", [("pointwise", {"threshold": 0.0, "epsilon": 0.01}), ("rlhf", {"beta": 1.0})])
def test_log_z_estimate_converges_to_the_exact_value(kind, kw):
    """Pooled log Ẑ(c) from samples of a: within z·se(n) at n = 100, 1,000, 10,000 per prompt.

    se(n) = sd_a(P/a) / (Z √n), the delta-method standard error computed exactly.
    """
    prob = problem(kind, **kw)
    ex = prob.exact()
    weights = torch.exp(ex.log_target - ex.log_a)                 # P/a for every completion
    a = torch.exp(ex.log_a)
    sd = torch.sqrt((a * (weights - torch.exp(ex.log_z)[:, None]) ** 2).sum(-1))
    checkpoints = [100, 1_000, 10_000]
    bound = z_bound(0.999, 2 * len(checkpoints))
    running, seen, errors = estimators.RunningLogZ(), 0, []
    generator = torch.Generator().manual_seed(11)
    for n in checkpoints:
        samples = prob.base.sample(prob.prompt_tokens(), n - seen, generator=generator)
        log_w = prob.target.log_potential(prob.reward(samples))   # log P − log q with q = a
        pooled = running.update(samples.prompt_keys, log_w)
        seen = n
        estimate = torch.tensor([running.log_z(c) for c in range(SPACE.num_prompts)], dtype=torch.float64)
        se = sd / (torch.exp(ex.log_z) * math.sqrt(n))
        error = (estimate - ex.log_z).abs()
        assert (error <= bound * se).all(), (n, error, se)
        errors.append(error.max().item())
        # the batch estimate of log_partition agrees with the pooled one on a single batch
        if n == checkpoints[0]:
            torch.testing.assert_close(estimators.log_partition(log_w, samples.prompt_index, 2), estimate)
            torch.testing.assert_close(pooled, estimate[samples.prompt_index])
    assert errors[-1] < 0.02


# ---------------------------------------------------------------- divergences by importance sampling

CASES = {
    # on-policy, as the evaluation stage uses it: samples of π = a itself
    "pointwise-onpolicy": ("pointwise", {"threshold": 0.0, "epsilon": 0.01}, False),
    "rlhf-onpolicy": ("rlhf", {"beta": 1.0}, False),
    # offline proposal q = a while π is another policy
    "rlhf-offline": ("rlhf", {"beta": 1.0}, True),
}
REPLICATES = 30
# Off-policy terms such as Neyman χ²'s (p − π)²/(qπ) are heavy-tailed: the normal approximation
# behind the z-scores needs more samples per replicate than on-policy.
SAMPLES = {False: 256, True: 1024}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("self_normalised", [False, True], ids=["exact-logZ", "self-normalised"])
def test_importance_sampling_divergences_match_exact_within_standard_errors(case, self_normalised):
    kind, kw, offline = CASES[case]
    prob = problem(kind, **kw)
    policy = perturbed_policy() if offline else prob.base
    ex = SPACE.exact(policy, prob.base, prob.reward.values, prob.target)
    proposal = prob.base
    names = divergences.NAMES
    z = {name: [] for name in names}
    for seed in range(REPLICATES):
        samples, log_pi, log_target, log_q = sampled_terms(prob, policy, proposal, SAMPLES[offline], seed)
        log_z = None if self_normalised else ex.log_z[samples.prompt_index]
        est = estimators.importance_divergences(log_pi, log_target, log_q, samples.prompt_index, 2, log_z=log_z)
        for name in names:
            z[name].append((est[name].value - ex.divergences[name]) / est[name].stderr)
    comparisons = len(names) * len(CASES) * 2
    bound = z_bound(0.999, comparisons * REPLICATES)
    low, high = chi2_band(REPLICATES, 0.999, comparisons)
    for name in names:
        scores = torch.tensor(z[name])
        assert scores.abs().max() <= bound, (name, scores)
        assert low <= (scores ** 2).sum().item() <= high, (name, (scores ** 2).mean().sqrt())


def test_estimates_for_a_hard_constraint_count_mass_outside_the_support():
    """ε = 0: samples with P = 0 make rkl and χ² infinite; TV, JS, KL(p‖π), rχ² stay exact."""
    prob = problem("pointwise", threshold=0.0, epsilon=0.0)
    ex = prob.exact()
    assert math.isinf(ex.divergences["rkl"]) and math.isinf(ex.divergences["chi2"])
    samples, log_pi, log_target, log_q = sampled_terms(prob, prob.base, prob.base, 2000, 0)
    assert torch.isneginf(log_target).any()
    for log_z in (None, ex.log_z[samples.prompt_index]):
        est = estimators.importance_divergences(log_pi, log_target, log_q, samples.prompt_index, 2, log_z=log_z)
        assert math.isinf(est["rkl"].value) and math.isinf(est["chi2"].value)
        for name in ("fkl", "js", "tv", "rchi2"):
            assert abs(est[name].value - ex.divergences[name]) <= z_bound(0.999, 8) * est[name].stderr, name
    # TV is at least the mass outside the support
    assert ex.divergences["tv"] >= 0.5 * (1 - float(torch.exp(ex.log_a).mul(torch.isfinite(ex.log_p)).sum(-1).mean()))


def test_kl_to_the_base_from_samples():
    prob = problem("rlhf", beta=1.0)
    policy = perturbed_policy(0.5)
    exact = float(SPACE.kl(SPACE.log_probs(policy), SPACE.log_probs(prob.base)))
    samples, log_pi, _, _ = sampled_terms(prob, policy, policy, 2000, 3)
    log_a = prob.base.score(samples).logprobs.double()
    est = estimators.kl_from_samples(log_pi, log_a, samples.prompt_index, 2)
    assert abs(est.value - exact) <= z_bound(0.999, 1) * est.stderr
    assert est.stderr < 0.05 * exact
