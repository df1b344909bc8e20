"""The exact toy space: enumeration, sampling, exact quantities and exact gradients.

The toy model runs behind the same `CausalPolicy` as the language model; these tests check
that what the policy samples is what the enumeration says it should be, and that the
enumeration's exact values (Z, p, divergences, KL, gradients) are right.
"""
import math
from statistics import NormalDist

import pytest
import torch

from fdpipe.fdpg import divergences, toy
from fdpipe.models.policy import CausalPolicy
from fdpipe.fdpg.targets import Target


@pytest.fixture(scope="module")
def space():
    return toy.ToySpace(3, 2, 3)


@pytest.fixture(scope="module")
def problem(space):
    return toy.build_problem(space, Target("pointwise", threshold=0.0, epsilon=0.01), model_seed=0, reward_seed=1)


def test_enumeration_lists_every_completion_once(space):
    assert space.size == sum(3 ** k for k in range(4)) == 40
    assert len({tuple(s) for s in space.sequences}) == space.size
    assert max(len(s) for s in space.sequences) == 3
    model = space.make_model()
    assert model.vocab_size == 6                     # EOS, 3 content tokens, 2 prompts
    samples = space.all_samples(model)
    completions = samples.completion_ids()
    assert all(c[-1] == toy.EOS and toy.EOS not in c[:-1] for c in completions)


def test_exact_probabilities_are_normalised_and_use_the_policy_interface(space, problem):
    assert isinstance(problem.policy, CausalPolicy)
    log_pi = space.log_probs(problem.policy)
    assert log_pi.shape == (2, 40)
    torch.testing.assert_close(torch.logsumexp(log_pi, -1), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_sampling_follows_the_exact_distribution(space, problem):
    """Pearson χ² goodness of fit of 5,000 samples per prompt, at 99.9% confidence."""
    n = 5_000
    samples = problem.base.sample(problem.prompt_tokens(), n, generator=torch.Generator().manual_seed(0))
    # the log-probabilities recorded while sampling are the training forward's
    scored = problem.base.score(samples).logprobs
    assert (samples.sample_logprobs - scored).abs().max().item() < 1e-5
    counts = torch.zeros(2, space.size, dtype=torch.float64)
    counts.index_put_((space.prompt_index(samples), space.sequence_index(samples)),
                      torch.ones(len(samples), dtype=torch.float64), accumulate=True)
    expected = n * torch.exp(space.log_probs(problem.base))
    stat = ((counts - expected) ** 2 / expected).sum().item()
    dof = 2 * (space.size - 1)
    # Wilson–Hilferty approximation of the χ² quantile
    z = NormalDist().inv_cdf(0.999)
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert stat < limit
    # and the test has power: frequencies of another model fail it
    other = n * torch.exp(space.log_probs(toy.make_policy(space.make_model(seed=5))))
    assert ((counts - other) ** 2 / other).sum().item() > 10 * limit


def test_reward_table_is_looked_up_by_completion(space, problem):
    samples = space.all_samples(problem.base.model)
    torch.testing.assert_close(problem.reward(samples), problem.reward.values.reshape(-1))
    sampled = problem.base.sample(problem.prompt_tokens(), 50, generator=torch.Generator().manual_seed(1))
    index = {tuple(s): i for i, s in enumerate(space.sequences)}
    expected = [problem.reward.values[c, index[tuple(t for t in comp if t != toy.EOS)]]
                for c, comp in zip(sampled.prompt_index.tolist(), sampled.completion_ids())]
    torch.testing.assert_close(problem.reward(sampled), torch.stack(expected))


def test_exact_partition_function_and_target(space, problem):
    ex = problem.exact()
    a = torch.exp(ex.log_a)
    passing = problem.reward.values >= 0
    z = (a * passing).sum(-1) + 0.01 * (a * ~passing).sum(-1)
    torch.testing.assert_close(torch.exp(ex.log_z), z, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.exp(ex.log_p).sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(torch.exp(ex.log_p), a * torch.where(passing, 1.0, 0.01) / z[:, None])
    # at π = a: KL(π‖a) = 0, every D_f(a‖p) > 0, D_rkl = KL(a‖p) and D_fkl = KL(p‖a)
    assert ex.kl_pi_a == pytest.approx(0.0, abs=1e-6)
    assert all(v > 0 for v in ex.divergences.values())
    assert ex.divergences["rkl"] == pytest.approx(float(space.kl(ex.log_a, ex.log_p)), rel=1e-9)
    assert ex.divergences["fkl"] == pytest.approx(ex.kl_p_a, rel=1e-9)
    assert ex.constraint == pytest.approx(float((a * passing).sum(-1).mean()), rel=1e-9)


@pytest.mark.parametrize("name", divergences.NAMES)
def test_exact_gradient_is_the_f_dpg_gradient(space, problem, name):
    """∇D_f(π‖p) = Σ_x f′(π(x)/p(x)) ∇π(x), and central differences agree."""
    policy = toy.make_policy(space.make_model(seed=3, init_scale=0.5))
    log_p = problem.exact().log_p
    grad = space.divergence_gradient(name, policy, log_p)

    log_pi = space.log_probs(policy, grad=True)
    f_prime = divergences.f_prime(name, (log_pi - log_p).detach())
    surrogate = (f_prime * torch.exp(log_pi)).sum(-1).mean()
    expected = torch.autograd.grad(surrogate, policy.trainable_parameters())[0].reshape(-1).double()
    assert grad.norm() > 1e-3
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)

    table = policy.model.table
    for index in torch.topk(grad.abs(), 3).indices.tolist():
        h, row, col = 1e-2, index // table.shape[1], index % table.shape[1]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                table[row, col] += sign * h
            values.append(float(space.divergence(name, space.log_probs(policy), log_p)))
            with torch.no_grad():
                table[row, col] -= sign * h
        assert (values[0] - values[1]) / (2 * h) == pytest.approx(grad[index].item(), rel=2e-3, abs=1e-5)


@pytest.mark.parametrize("feature, moment", [("indicator", 0.9), ("reward", 1.0)])
def test_distributional_target_fitted_exactly_reproduces_the_moment(space, feature, moment):
    target = Target("distributional", threshold=0.0, feature=feature, moment=moment)
    problem = toy.build_problem(space, target, reward_seed=1)
    assert target.lam is not None and target.lam > 0
    ex = problem.exact()
    # the conditional target: the moment is the average over prompts of E_{p(·|c)}[φ]
    assert abs(ex.constraint_target - moment) < 1e-3
    phi = target.constraint(problem.reward.values)
    per_prompt = (torch.exp(ex.log_p) * phi).sum(-1)
    assert per_prompt.mean().item() == pytest.approx(ex.constraint_target, abs=1e-12)
    assert ex.constraint < moment                   # the base does not satisfy it


def test_model_shape_must_match_the_space(space):
    with pytest.raises(ValueError, match="does not match the space"):
        space.all_samples(toy.TabularLM(4, 2, 3))
