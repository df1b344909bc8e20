"""The sampled f-DPG gradient against the exact gradient of D_f(π‖p) on the toy space.

The estimator is the one the alignment loop uses — `CausalPolicy.sample`/`score`,
`update.pseudo_rewards`, `update.baseline` and `update.surrogate_loss` — with the exact log Z(c),
so it is unbiased. Each *chunk* is one sampling call holding `BATCHES` independent batches
(every batch: every prompt, `SAMPLES` completions each, its own leave-one-out groups); the
chunk's gradient is the mean of its batches' estimates. Over `CHUNKS` independent chunks the
mean gradient is projected on the exact gradient's direction and on random directions, and
each projection must agree with the exact one: two-sided z-test at 99.9% family-wise,
Bonferroni over every projection of every test in this module. The projection on the exact
direction must also be far from zero, so that a wrong sign or scale of the pseudo-reward
would fail.
"""
from statistics import NormalDist

import pytest
import torch

from fdpipe.fdpg import divergences, update, toy
from fdpipe.fdpg.targets import Target


SPACE = toy.ToySpace(3, 2, 3)
CHUNKS, BATCHES, SAMPLES = 60, 8, 8
DIRECTIONS = 4                      # random directions, plus the exact gradient's direction
MODES = ("on-policy", "offline")
COMPARISONS = (DIRECTIONS + 1) * (len(divergences.NAMES) * len(MODES) + 2 * 2)
Z = NormalDist().inv_cdf(1 - 0.001 / (2 * COMPARISONS))


@pytest.fixture(scope="module")
def problem():
    return toy.build_problem(SPACE, Target("pointwise", threshold=0.0, epsilon=0.05), model_seed=0, reward_seed=1)


def moved_policy(scale=0.3, seed=4):
    """A policy between a and p (a perturbed copy of a), so the offline weights π/q vary."""
    model = SPACE.make_model(seed=0)
    with torch.no_grad():
        model.table.add_(scale * torch.randn(model.table.shape, generator=torch.Generator().manual_seed(seed)))
    return toy.make_policy(model)


def chunk_gradients(problem, policy, proposal, divergence, seed, baselines=("loo",)):
    """One chunk: the f-DPG gradient estimate for each baseline kind, from the same samples."""
    log_z = problem.exact().log_z
    prompts = problem.prompt_tokens() * BATCHES             # every copy is its own group
    samples = proposal.sample(prompts, SAMPLES, generator=torch.Generator().manual_seed(seed))
    group, num_groups = samples.prompt_index, samples.num_prompts
    log_pi = policy.score(samples).logprobs
    log_pi_d = log_pi.detach().double()
    log_target = problem.base.score(samples).logprobs.double() + problem.target.log_potential(problem.reward(samples))
    on_policy = proposal is policy
    weights = None if on_policy else torch.exp(log_pi_d - samples.sample_logprobs.double())
    rewards = update.pseudo_rewards(divergence, log_pi_d, log_target, log_z[SPACE.prompt_index(samples)])
    grads = {}
    for i, kind in enumerate(baselines):
        loss = update.surrogate_loss(log_pi, rewards - update.baseline(rewards, group, num_groups, kind), weights)
        (grad,) = torch.autograd.grad(loss, policy.trainable_parameters(), retain_graph=i + 1 < len(baselines))
        grads[kind] = grad.reshape(-1).double()
    return grads


def directions(exact, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(DIRECTIONS, exact.numel(), generator=g, dtype=torch.float64)
    return torch.cat([(exact / exact.norm())[None], rand / rand.norm(dim=1, keepdim=True)])


def assert_unbiased(estimates, exact):
    """z-test of each projection of the mean estimate; returns the exact direction's z-distance from 0."""
    dirs = directions(exact)
    proj = estimates @ dirs.T                               # [CHUNKS, 1 + DIRECTIONS]
    mean, se = proj.mean(0), proj.std(0) / len(proj) ** 0.5
    truth = dirs @ exact
    z = (mean - truth) / se
    assert (z.abs() <= Z).all(), f"z-scores {z.tolist()} exceed {Z:.2f}"
    return (truth[0] / se[0]).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", divergences.NAMES)
def test_sampled_gradient_agrees_with_the_exact_gradient(problem, name, mode):
    policy = moved_policy()
    proposal = policy if mode == "on-policy" else problem.base
    exact = SPACE.divergence_gradient(name, policy, problem.exact().log_p)
    estimates = torch.stack([chunk_gradients(problem, policy, proposal, name, seed)["loo"] for seed in range(CHUNKS)])
    separation = assert_unbiased(estimates, exact)
    assert separation > 2 * Z, f"the test cannot tell the gradient from zero (|g|/se = {separation:.1f})"


@pytest.mark.parametrize("name", ["rkl", "fkl"])
def test_baseline_reduces_variance_without_bias(problem, name):
    """Same samples with and without the leave-one-out baseline: both unbiased, less spread with it.

    The spread of a chunk is its squared distance to the exact gradient (an unbiased estimate
    of the covariance's trace, since both estimators are unbiased); the paired per-chunk
    differences must be positive by a one-sided z-test at 99.9%. rkl's pseudo-reward
    ``−log t − 1`` and fkl's ``1/t`` have a large mean that the baseline removes (for js and tv,
    whose pseudo-rewards are nearly centred, the leave-one-out baseline adds about 1/(n−1)
    of variance instead, as it should).
    """
    policy = moved_policy()
    exact = SPACE.divergence_gradient(name, policy, problem.exact().log_p)
    chunks = [chunk_gradients(problem, policy, policy, name, 1000 + seed, baselines=("loo", "none"))
              for seed in range(CHUNKS)]
    spread = {}
    for kind in ("loo", "none"):
        estimates = torch.stack([c[kind] for c in chunks])
        assert_unbiased(estimates, exact)
        spread[kind] = ((estimates - exact) ** 2).sum(1)
    gain = spread["none"] - spread["loo"]
    z = gain.mean() / (gain.std() / len(gain) ** 0.5)
    assert z > NormalDist().inv_cdf(0.999), (z, spread["loo"].mean() / spread["none"].mean())
    assert spread["loo"].mean() < 0.8 * spread["none"].mean()


def test_baseline_values():
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 10.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 2])
    loo = update.baseline(rewards, group, 3, "loo")
    # prompt 0: mean of the two others; prompts 1 and 2 have one sample: mean of the rest of the batch
    torch.testing.assert_close(loo, torch.tensor([4.0, 3.5, 1.5, 19 / 4, 13 / 4], dtype=torch.float64))
    torch.testing.assert_close(update.baseline(rewards, group, 3, "mean"), torch.full_like(rewards, 4.6))
    assert (update.baseline(rewards, group, 3, "none") == 0).all()
    with pytest.raises(ValueError, match="loo, mean, none"):
        update.baseline(rewards, group, 3, "median")


def test_surrogate_loss_gradient_is_the_weighted_score_function():
    log_pi = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(update.surrogate_loss(log_pi, advantages, weights), log_pi)
    torch.testing.assert_close(grad, -(weights * advantages) / 3)
    # advantages and weights are constants even when they carry a graph
    advantages.requires_grad_(True)
    (grad2,) = torch.autograd.grad(update.surrogate_loss(log_pi, advantages * 1.0), log_pi)
    torch.testing.assert_close(grad2, -advantages.detach() / 3)
