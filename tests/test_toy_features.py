"""Training on targets over named features, measured exactly on the toy space.

The features are computed by the same `FeatureScorer` as on the language model, from the
toy completions' texts (letters ``a``, ``b``, ``c``): ``has_a`` (a word list), ``long`` (a
regex: at least two tokens), ``good`` (reward ≥ 0) and ``reward`` (real-valued). Every
generator, with the toy study's settings (100 steps, 32 samples per prompt, Adam at 0.1
decaying linearly to 0), must cut its exact ``D_f(π‖p)`` by at least 90% from ``π = a`` and
end with each ``E_π[φ_k]`` within 0.02 of what the target requests: the moment itself for a
distributional target (fitted exactly, within 1e-3), ``E_p[φ_k]`` for a pointwise one.
"""
import math

import pytest

from fdpipe.fdpg import divergences
from fdpipe.fdpg.toy import build_problem
from fdpipe.fdpg.targets import Target
from fdpipe.stages import toy_study

STEPS = 100
STUDY = toy_study.ToyStudyConfig(steps=STEPS)
DEFS = {"has_a": {"kind": "words", "words": ["a"]},
        "long": {"kind": "regex", "pattern": r"^\S+ \S+"},
        "good": {"kind": "reward", "threshold": 0.0},
        "reward": {"kind": "reward"}}
TARGETS = {
    # a conjunction: at least two tokens and a non-negative reward, each with its own floor
    "pointwise": {"kind": "pointwise", "features": {"long": {"epsilon": 0.1}, "good": {"epsilon": 0.2}}},
    # a binary and a real-valued feature, λ fitted jointly
    "distributional": {"kind": "distributional", "features": {"has_a": {"moment": 0.6}, "reward": {"moment": 0.8}}},
}


def train(kind, name, steps=STEPS, cfg=None):
    target = Target.from_config(cfg or TARGETS[kind], key=f"toy.{kind}", definitions=DEFS)
    problem = build_problem(STUDY.space(), target, model_seed=STUDY.model_seed, reward_seed=STUDY.reward_seed)
    study = toy_study.ToyStudyConfig(steps=steps)
    curve = toy_study.train_run(problem, study.align_config(name), seed=0, eval_every=steps)
    return problem, curve.iloc[0], curve.iloc[-1]


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("name", divergences.NAMES)
def test_two_feature_targets_are_reached_by_every_divergence(kind, name):
    problem, start, end = train(kind, name)
    assert start["kl_pi_a"] == pytest.approx(0.0, abs=1e-6)
    assert end["objective_ratio"] <= 0.1, (start["objective"], end["objective"])
    requested = problem.target.requested()
    for feature in problem.target.feature_names:
        aim = end[f"feature_{feature}_target"]                    # E_p[φ_k]
        if feature in requested:
            assert abs(aim - requested[feature]) < 1e-3
        assert abs(start[f"feature_{feature}"] - aim) > 0.15       # the base is far from it
        assert abs(end[f"feature_{feature}"] - aim) <= 0.02, (feature, end[f"feature_{feature}"], aim)


def test_a_hard_zero_is_approached_by_forward_kl():
    """With ε = 0 on `long`, p puts no mass on one-token completions (E_p[long] = 1 exactly)
    and KL(π‖p) is infinite at π = a; forward KL (GDC) still trains towards it."""
    cfg = {"kind": "pointwise", "features": {"long": {"epsilon": 0.0}, "good": {"epsilon": 0.2}}}
    problem, start, end = train("pointwise", "fkl", cfg=cfg)
    assert end["feature_long_target"] == 1.0 and math.isinf(start["exact_rkl"])
    assert end["objective_ratio"] <= 0.1
    assert end["feature_long"] >= 0.95 > start["feature_long"] + 0.5
