"""Targets over named features: potentials, the joint (vector) λ fit and its errors.

The vector fit is checked exactly on the enumerable toy space: every requested moment of a
3-feature distributional target (two binary features and the real-valued reward, with and
without a pointwise condition) is reproduced within 1e-3, prompt by prompt normalised.
"""
import math

import pytest
import torch

from fdpipe.common.errors import ConfigError
from fdpipe.fdpg import toy
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.lambda_fit import UnreachableMoment, fit_lambda, fit_lambdas
from fdpipe.fdpg.targets import Target

SPACE = toy.ToySpace(3, 2, 3)
DEFS = {"has_a": {"kind": "words", "words": ["a"]},
        "long": {"kind": "regex", "pattern": r"^\S+ \S+"},
        "good": {"kind": "reward", "threshold": 0.0},
        "reward": {"kind": "reward"}}


def target(kind, **uses):
    return Target.from_config({"kind": kind, "features": uses}, key="alignment.runs.g.target", definitions=DEFS)


def test_potentials_over_features():
    reward = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)   # columns: has_a, good
    pointwise = target("pointwise", has_a={"epsilon": 0.1}, good={"epsilon": 0.0})
    expected = torch.tensor([-math.inf, math.log(0.1), 0.0], dtype=torch.float64)
    torch.testing.assert_close(pointwise.log_potential(reward, phi), expected)
    torch.testing.assert_close(pointwise.constraint(reward, phi), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    combined = Target.from_config({"kind": "rlhf", "beta": 0.5, "features": {"good": {"epsilon": 0.2}}},
                                  definitions=DEFS)
    torch.testing.assert_close(combined.log_potential(reward, phi[:, 1:]),
                               reward / 0.5 + torch.tensor([math.log(0.2), 0.0, 0.0], dtype=torch.float64))
    dist = target("distributional", has_a={"moment": 0.3}, good={"epsilon": 0.5})
    dist.lam = (2.0,)
    torch.testing.assert_close(dist.log_potential(reward, phi),
                               torch.tensor([2.0 + math.log(0.5), 0.0, 2.0], dtype=torch.float64))
    assert dist.describe() == "distributional(E[has_a]=0.3, good[eps=0.5], lambda=(2))"
    assert pointwise.describe() == "pointwise(has_a[eps=0.1], good[eps=0])"
    with pytest.raises(ValueError, match="needs their values"):
        pointwise.log_potential(reward)


def test_target_json_round_trip():
    dist = target("distributional", has_a={"moment": 0.3}, reward={"moment": -0.1}, good={"epsilon": 0.5})
    dist.lam = (1.5, -0.25)
    back = Target.from_config(dist.to_config(), key="target.json", definitions=dist.to_config()["feature_definitions"])
    assert back == dist and back.describe() == dist.describe()
    with pytest.raises(ConfigError, match="'target.json.lambda': expected a list of 2 numbers"):
        Target.from_config({**dist.to_config(), "lambda": [1.0]}, key="target.json",
                           definitions=dist.to_config()["feature_definitions"])


@pytest.mark.parametrize("uses", [
    {"has_a": {"moment": 0.6}, "long": {"moment": 0.3}, "reward": {"moment": 0.4}},
    {"has_a": {"moment": 0.5}, "reward": {"moment": 0.2}, "good": {"epsilon": 0.05}},
])
def test_vector_fit_reproduces_every_moment_on_the_enumeration(uses):
    t = target("distributional", **uses)
    problem = toy.build_problem(SPACE, t, reward_seed=1)
    ex = problem.exact()
    assert problem.lambda_fit.error < 1e-8
    for name, moment in t.requested().items():
        assert abs(ex.features_target[name] - moment) < 1e-3, name
        assert abs(ex.features[name] - moment) > 0.02, name          # the base does not already satisfy it
    # per prompt normalised: the requested value is the mean over prompts of E_p(.|c)[φ]
    phi = problem.features.values[..., 0]
    per_prompt = (torch.exp(ex.log_p) * phi).sum(-1)
    assert per_prompt.mean().item() == pytest.approx(ex.features_target["has_a"], abs=1e-12)
    assert (per_prompt[0] - per_prompt[1]).abs() > 1e-3


def test_vector_fit_of_one_feature_is_the_scalar_fit():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(50, dtype=torch.float64, generator=g)
    log_w = torch.randn(50, dtype=torch.float64, generator=g)
    group = torch.arange(50) % 3
    scalar = fit_lambda(phi, log_w, 0.4, group=group, tol=1e-12)
    vector = fit_lambdas(phi[:, None], log_w, [0.4], group=group, tol=1e-12)
    assert vector.lam[0] == pytest.approx(scalar.lam, rel=1e-9)


def test_moments_of_a_known_lambda_are_found_again():
    """Points in 40 groups of 2 (as 2 samples per prompt), 3 real features: the moments that a
    λ* gives are reached again (within 1e-10) by the fit started at λ = 0."""
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(80, 3, dtype=torch.float64, generator=g)
    log_w = torch.randn(80, dtype=torch.float64, generator=g)
    group = torch.arange(80) // 2
    lam_star = torch.tensor([0.8, -1.5, 0.3], dtype=torch.float64)
    w = torch.softmax((log_w + phi @ lam_star).reshape(40, 2), -1).reshape(-1)
    moments = (torch.zeros(40, 3, dtype=torch.float64).index_add_(0, group, w[:, None] * phi)).mean(0)
    fit = fit_lambdas(phi, log_w, moments, group=group, tol=1e-10)
    assert fit.error < 1e-10
    torch.testing.assert_close(torch.tensor(fit.lam, dtype=torch.float64), lam_star, rtol=1e-6, atol=1e-6)


def test_unreachable_moments_name_their_constraint():
    phi = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(UnreachableMoment, match=r"E_p\[b\] can only lie in \(0, 1\)") as err:
        fit_lambdas(phi, zeros, [0.5, 1.0], names=["a", "b"])
    assert err.value.index == 1
    # each moment alone is in range, but two identical features cannot have different moments
    with pytest.raises(UnreachableMoment, match="not reachable together") as err:
        fit_lambdas(phi, zeros, [0.3, 0.7], names=["a", "b"])
    # consistent moments of identical features are fine (minimum-norm Newton steps)
    fit = fit_lambdas(phi, zeros, [0.3, 0.3], names=["a", "b"], tol=1e-10)
    assert fit.error < 1e-10 and fit.lam[0] == pytest.approx(fit.lam[1])


def test_aligner_fit_on_base_samples_stops_with_the_key_of_an_unreachable_moment():
    """The rewards of the toy space are standard normal: a requested mean reward of 3.5 lies
    above every fitting sample's, so the run stops before its first step naming the key."""
    t = target("distributional", has_a={"moment": 0.5}, reward={"moment": 3.5})
    problem = toy.build_problem(SPACE, t, reward_seed=1, fit_exactly=False)
    cfg = AlignConfig(divergence="fkl", prompts_per_step=2, samples_per_prompt=4, fit_samples=8)
    aligner = Aligner(problem.policy, problem.base, problem.reward, t,
                      PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), 0), cfg,
                      generator=torch.Generator().manual_seed(0), feature_fn=problem.features)
    with pytest.raises(ConfigError) as err:
        aligner.step()
    message = str(err.value)
    assert message.startswith("config key 'alignment.runs.g.target.features.reward.moment': expected a moment "
                              "reachable on the 8 fitting samples of the base (E_p[reward] can only lie in")
    assert message.endswith("got 3.5") and "\n" not in message and aligner.step_count == 0


def test_aligner_fits_the_vector_lambda_on_base_samples():
    """Fitted on 1024 samples of the base (self-normalised IS per prompt), λ gives every
    requested moment within 0.05 exactly; the metrics of a step report each feature."""
    t = target("distributional", has_a={"moment": 0.6}, reward={"moment": 0.4})
    problem = toy.build_problem(SPACE, t, reward_seed=1, fit_exactly=False)
    cfg = AlignConfig(divergence="fkl", prompts_per_step=2, samples_per_prompt=32, fit_samples=1024,
                      fit_tolerance=1e-8)
    aligner = Aligner(problem.policy, problem.base, problem.reward, t,
                      PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), 0), cfg,
                      generator=torch.Generator().manual_seed(0), feature_fn=problem.features)
    metrics = aligner.step()
    ex = problem.exact()
    for name, moment in t.requested().items():
        assert abs(ex.features_target[name] - moment) < 0.05
    assert metrics["lambda_has_a"] == t.lam[0] and metrics["lambda_reward"] == t.lam[1]
    assert math.isnan(metrics["lambda"]) and math.isnan(metrics["constraint"])
    assert {"feature_has_a", "feature_reward"} <= set(metrics)
