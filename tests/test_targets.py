"""Targets: configuration, potentials, and the λ fit of distributional targets.

The λ fit is checked exactly on the toy space (the requested moment is reproduced within
1e-3, prompt by prompt normalised) and, through the `Aligner`, on samples of the base
(within the Monte-Carlo error of self-normalised importance sampling, 99.9% z-test).
"""
import math
from statistics import NormalDist

import pytest
import torch

from fdpipe.fdpg import toy
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.common.errors import ConfigError
from fdpipe.fdpg.targets import Target, fit_lambda


SPACE = toy.ToySpace(3, 2, 3)


@pytest.mark.parametrize("cfg, key", [
    ({"kind": "ppo"}, "run.target.kind"),
    ({"kind": "rlhf", "beta": 0}, "run.target.beta"),
    ({"kind": "pointwise", "epsilon": 1.0}, "run.target.epsilon"),
    ({"kind": "distributional", "feature": "length"}, "run.target.feature"),
    ({"kind": "distributional", "moment": 1.0}, "run.target.moment"),
])
def test_bad_target_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Target.from_config(cfg, key="run.target")


def test_log_potentials():
    reward = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(Target("rlhf", beta=0.5).log_potential(reward), reward / 0.5)
    pointwise = Target("pointwise", threshold=0.5, epsilon=0.01).log_potential(reward)
    torch.testing.assert_close(pointwise, torch.tensor([math.log(0.01), 0.0, 0.0], dtype=torch.float64))
    hard = Target("pointwise", threshold=0.5, epsilon=0.0).log_potential(reward)
    assert hard[0].item() == -math.inf and (hard[1:] == 0).all()
    dist = Target("distributional", threshold=0.5, lam=2.0)
    torch.testing.assert_close(dist.log_potential(reward), torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(Target("distributional", feature="reward", lam=2.0).log_potential(reward), 2 * reward)
    with pytest.raises(RuntimeError, match="fit_lambda"):
        Target("distributional").log_potential(reward)


def test_fit_lambda_on_weighted_points_is_exact():
    phi = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    log_w = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
    fit = fit_lambda(phi, log_w, 2.0, tol=1e-10)
    p = torch.softmax(log_w + fit.lam * phi, 0)
    assert (p * phi).sum().item() == pytest.approx(2.0, abs=1e-9)
    assert fit.error < 1e-9 and fit.lam > 0


def test_fit_lambda_with_groups_matches_the_average_over_prompts():
    phi = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    log_w = torch.log(torch.tensor([0.9, 0.1, 0.2, 0.8], dtype=torch.float64))
    group = torch.tensor([0, 0, 1, 1])
    fit = fit_lambda(phi, log_w, 0.7, group=group, tol=1e-10)
    per_prompt = [torch.softmax(log_w[g] + fit.lam * phi[g], 0)[1].item() for g in ([0, 1], [2, 3])]
    assert sum(per_prompt) / 2 == pytest.approx(0.7, abs=1e-9)
    # pooled (one group) is a different target: prompts weighted by their Z(c)
    pooled = fit_lambda(phi, log_w, 0.7, tol=1e-10)
    assert abs(pooled.lam - fit.lam) > 0.1


def test_unreachable_moment_is_refused():
    phi = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="not reachable"):
        fit_lambda(phi, torch.zeros(3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="not reachable"):
        fit_lambda(phi, torch.zeros(3, dtype=torch.float64), 0.5, group=torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("moment", [0.6, 0.9])
def test_exact_fit_on_the_toy_space_reproduces_the_moment(moment):
    target = Target("distributional", threshold=0.0, moment=moment)
    problem = toy.build_problem(SPACE, target, reward_seed=1)
    assert problem.lambda_fit.error < 1e-6
    assert abs(problem.exact().constraint_target - moment) < 1e-3


@pytest.mark.parametrize("per_step, per_fit", [(32, None), (2, 32)])
def test_aligner_fits_lambda_on_base_samples_within_monte_carlo_error(per_step, per_fit):
    """The Aligner's fit (self-normalised IS per prompt on `fit_samples` samples of a) reproduces the moment.
    The fit draws ``fit_samples_per_prompt`` samples per prompt (default: a step's ``samples_per_prompt``).

    Its error in the exact moment is that of the average over prompts of per-prompt ratio
    estimators at the exact λ: se² = Σ_c E_a[w² (φ − m_c)²] / (n_c E_a[w]²) / C², w = e^{λφ},
    computed exactly; two-sided z-test at 99.9%. Fitted exactly but pooled (all prompts
    normalised together), λ would miss the conditional moment by 0.035 here.
    """
    moment, n = 0.9, 512
    exact_target = Target("distributional", threshold=0.0, moment=moment)
    exact_problem = toy.build_problem(SPACE, exact_target, reward_seed=1)
    target = Target("distributional", threshold=0.0, moment=moment)
    problem = toy.build_problem(SPACE, target, reward_seed=1, fit_exactly=False)
    cfg = AlignConfig(divergence="fkl", prompts_per_step=2, samples_per_prompt=per_step, fit_samples=n,
                      fit_samples_per_prompt=per_fit, fit_tolerance=1e-8)
    aligner = Aligner(problem.policy, problem.base, problem.reward, target,
                      PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), 0), cfg,
                      generator=torch.Generator().manual_seed(0))
    drawn, sample = [], problem.base.sample
    problem.base.sample = lambda tokens, k, **kw: drawn.append(k) or sample(tokens, k, **kw)
    aligner.prepare_target()
    assert drawn and set(drawn) == {32}
    assert target.lam is not None and aligner.lambda_fit.error < 1e-6

    ex = exact_problem.exact()
    a = torch.exp(ex.log_a)
    phi = target.constraint(problem.reward.values)
    w = torch.exp(exact_target.lam * phi)
    m_c = (torch.exp(ex.log_p) * phi).sum(-1, keepdim=True)
    n_c = n / SPACE.num_prompts
    var_c = (a * w ** 2 * (phi - m_c) ** 2).sum(-1) / (n_c * (a * w).sum(-1) ** 2)
    se = math.sqrt(var_c.sum().item()) / SPACE.num_prompts
    reached = problem.exact().constraint_target
    bound = NormalDist().inv_cdf(1 - 0.0005) * se
    assert abs(reached - moment) <= bound, (reached, se)
    assert bound < 0.05

    la = ex.log_a.reshape(-1)
    pooled = fit_lambda(phi.reshape(-1), la, moment, tol=1e-10)
    exact_target.lam = pooled.lam
    assert abs(exact_problem.exact().constraint_target - moment) > 0.03
