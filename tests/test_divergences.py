"""The generators of `fdpipe.fdpg.divergences` against their closed forms, in float64.

* ``f`` and ``f′`` (functions of ``log t``) equal the closed forms of the table in the module
  docstring, ``f(1) = 0``, ``f′`` is the derivative of ``f`` and ``f`` is convex;
* `divergences.exact` equals each divergence computed by enumeration from its textbook
  definition (KL both ways, Jensen–Shannon through the mixture, total variation, χ² both
  ways), including the ``p = 0`` convention;
* on the toy space, the gradient of ``KL(π‖p)`` for the rlhf target equals −1/β times the
  gradient of the KL-regularised reward ``E_π[r] − β KL(π‖a)``, and rkl's pseudo-rewards are
  the RLHF rewards ``(r − β log π/a)/β`` up to a per-prompt constant that the baseline removes.
"""
import math

import pytest
import torch

from fdpipe.fdpg import divergences, update, toy
from fdpipe.fdpg.targets import Target


LOG_T = torch.linspace(-7.0, 7.0, 281, dtype=torch.float64)

CLOSED_F = {
    "rkl": lambda t: t * torch.log(t),
    "fkl": lambda t: -torch.log(t),
    "js": lambda t: 0.5 * (t * torch.log(t) - (1 + t) * torch.log((1 + t) / 2)),
    "tv": lambda t: 0.5 * torch.abs(t - 1),
    "chi2": lambda t: (t - 1) ** 2,
    "rchi2": lambda t: (1 - t) ** 2 / t,
}
CLOSED_F_PRIME = {
    "rkl": lambda t: torch.log(t) + 1,
    "fkl": lambda t: -1 / t,
    "js": lambda t: 0.5 * torch.log(2 * t / (1 + t)),
    "tv": lambda t: 0.5 * torch.sign(t - 1),
    "chi2": lambda t: 2 * (t - 1),
    "rchi2": lambda t: 1 - 1 / t ** 2,
}


def test_every_generator_is_tested():
    assert set(divergences.NAMES) == set(CLOSED_F) == set(CLOSED_F_PRIME)


@pytest.mark.parametrize("name", divergences.NAMES)
def test_f_and_f_prime_match_closed_forms(name):
    t = torch.exp(LOG_T)
    torch.testing.assert_close(divergences.f(name, LOG_T), CLOSED_F[name](t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(divergences.f_prime(name, LOG_T), CLOSED_F_PRIME[name](t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(divergences.get(name).pseudo_reward(LOG_T), -CLOSED_F_PRIME[name](t))


@pytest.mark.parametrize("name", divergences.NAMES)
def test_f_is_normalised_convex_and_f_prime_is_its_derivative(name):
    zero = torch.zeros(1, dtype=torch.float64)
    assert divergences.f(name, zero).item() == pytest.approx(0.0, abs=1e-15)
    # df/dt = (df/dlog t) / t, by autograd through the log-space implementation
    log_t = LOG_T[LOG_T != 0].clone().requires_grad_(True)    # tv has a kink at t = 1
    (grad,) = torch.autograd.grad(divergences.f(name, log_t).sum(), log_t)
    torch.testing.assert_close(grad / torch.exp(log_t), divergences.f_prime(name, log_t.detach()),
                               rtol=1e-9, atol=1e-12)
    # convex: f′ is non-decreasing in t (hence in log t)
    assert (torch.diff(divergences.f_prime(name, LOG_T)) >= -1e-12).all()


@pytest.mark.parametrize("name", divergences.NAMES)
def test_f_stays_finite_where_t_under_or_overflows_in_linear_space(name):
    log_t = torch.tensor([-700.0, -50.0, 50.0], dtype=torch.float64)
    assert torch.isfinite(divergences.f(name, log_t)).all()
    assert torch.isfinite(divergences.f_prime(name, log_t[1:])).all()


def _random_pair(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    pi = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    p = torch.softmax(2 * torch.randn(n, generator=g, dtype=torch.float64), 0)
    return pi, p


def _textbook(name, pi, p):
    """Each divergence from its usual definition (not from f)."""
    def kl(a, b):
        keep = a > 0
        return (a[keep] * torch.log(a[keep] / b[keep])).sum()
    m = (pi + p) / 2
    return {
        "rkl": kl(pi, p),
        "fkl": kl(p, pi),
        "js": 0.5 * kl(pi, m) + 0.5 * kl(p, m),
        "tv": 0.5 * torch.abs(pi - p).sum(),
        "chi2": ((pi - p) ** 2 / p).sum(),
        "rchi2": ((p - pi) ** 2 / pi).sum(),
    }[name]


@pytest.mark.parametrize("name", divergences.NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_matches_the_enumerated_divergence(name, seed):
    pi, p = _random_pair(seed=seed)
    expected = _textbook(name, pi, p)
    torch.testing.assert_close(divergences.exact(name, torch.log(pi), torch.log(p)), expected, rtol=1e-10, atol=1e-12)
    # and Σ_x p f(π/p) with the closed form of f
    torch.testing.assert_close(expected, (p * CLOSED_F[name](pi / p)).sum(), rtol=1e-10, atol=1e-12)
    assert divergences.exact(name, torch.log(p), torch.log(p)).abs().item() < 1e-12


@pytest.mark.parametrize("name", divergences.NAMES)
def test_f_prime_is_the_derivative_of_the_divergence(name):
    """∂/∂π(x) Σ_y p(y) f(π(y)/p(y)) = f′(π(x)/p(x)): the gradient f-DPG follows."""
    pi, p = _random_pair(seed=3)
    log_pi = torch.log(pi).requires_grad_(True)
    (grad,) = torch.autograd.grad(divergences.exact(name, log_pi, torch.log(p)), log_pi)
    torch.testing.assert_close(grad / pi, CLOSED_F_PRIME[name](pi / p), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", divergences.NAMES)
def test_exact_outside_the_target_support(name):
    """Where p = 0 the π-mass counts with lim f(t)/t (∞ for rkl and chi2)."""
    pi, p = _random_pair(seed=4)
    p = torch.where(torch.arange(len(p)) < 3, torch.zeros_like(p), p)
    p = p / p.sum()
    value = divergences.exact(name, torch.log(pi), torch.log(p))
    if name in ("rkl", "chi2"):
        assert value.item() == math.inf
    else:
        expected = {"fkl": _textbook("fkl", pi, p), "js": _textbook("js", pi, p),
                    "tv": _textbook("tv", pi, p), "rchi2": _textbook("rchi2", pi, p)}[name]
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_unknown_divergence_names_the_choices():
    with pytest.raises(ValueError, match="rkl, fkl, js, tv, chi2, rchi2"):
        divergences.get("hellinger")


# ---------------------------------------------------------------- rkl is RLHF

@pytest.fixture(scope="module")
def rlhf_problem():
    space = toy.ToySpace(3, 2, 3)
    problem = toy.build_problem(space, Target("rlhf", beta=0.5), model_seed=0, reward_seed=1)
    # move π away from a so that both gradients are far from zero
    with torch.no_grad():
        problem.policy.model.table.add_(0.5 * torch.randn(problem.policy.model.table.shape,
                                                          generator=torch.Generator().manual_seed(7)))
    return problem


def test_rkl_gradient_is_the_kl_regularised_reward_gradient(rlhf_problem):
    problem = rlhf_problem
    space, beta = problem.space, problem.target.beta
    log_p = problem.exact().log_p
    grad_rkl = space.divergence_gradient("rkl", problem.policy, log_p)

    log_pi = space.log_probs(problem.policy, grad=True)
    log_a = space.log_probs(problem.base)
    pi = torch.exp(log_pi)
    reward = problem.reward.values
    objective = ((pi * reward).sum(-1) - beta * (pi * (log_pi - log_a)).sum(-1)).mean()
    grad_rl = torch.autograd.grad(objective, problem.policy.trainable_parameters())[0].reshape(-1).double()

    assert grad_rkl.norm() > 1e-2
    torch.testing.assert_close(grad_rkl, -grad_rl / beta, rtol=1e-4, atol=1e-6)


def test_rkl_pseudo_rewards_are_rlhf_rewards_up_to_the_baseline(rlhf_problem):
    problem = rlhf_problem
    ex = problem.exact()
    samples = problem.policy.sample(problem.prompt_tokens(), 16, generator=torch.Generator().manual_seed(0))
    log_pi = problem.policy.score(samples).logprobs.detach().double()
    log_a = problem.base.score(samples).logprobs.double()
    reward = problem.reward(samples)
    log_target = log_a + problem.target.log_potential(reward)
    group, n = samples.prompt_index, samples.num_prompts
    pseudo = update.pseudo_rewards("rkl", log_pi, log_target, ex.log_z[group])
    rlhf = (reward - problem.target.beta * (log_pi - log_a)) / problem.target.beta
    # −f′ = −log(π/p) − 1 = RLHF reward − log Z(c) − 1
    torch.testing.assert_close(pseudo, rlhf - ex.log_z[group] - 1, rtol=1e-9, atol=1e-9)
    # any log Z estimate gives the same advantages once the per-prompt baseline is removed
    wrong_z = update.pseudo_rewards("rkl", log_pi, log_target, torch.zeros_like(log_pi))
    for rewards in (pseudo, wrong_z):
        torch.testing.assert_close(rewards - update.baseline(rewards, group, n, "loo"),
                                   rlhf - update.baseline(rlhf, group, n, "loo"), rtol=1e-9, atol=1e-9)
