"""A non-finite reward, loss or gradient stops the f-DPG loop before it reaches the policy."""
import pytest
import torch

from fdpipe.fdpg import toy
from fdpipe.fdpg.aligner import AlignConfig, Aligner, PromptCycle
from fdpipe.fdpg.targets import Target
from fdpipe.training.guards import NonFiniteError

SPACE = toy.ToySpace(3, 2, 3)


def _aligner(reward_fn, **cfg):
    problem = toy.build_problem(SPACE, Target("rlhf", beta=1.0), model_seed=1, reward_seed=2)
    prompts = PromptCycle(problem.prompt_keys(), problem.prompt_tokens(), 0)
    aligner = Aligner(problem.policy, problem.base, reward_fn(problem.reward), problem.target, prompts,
                      AlignConfig(prompts_per_step=2, samples_per_prompt=4, lr=0.1, **cfg),
                      generator=torch.Generator().manual_seed(0), state_path="results/align/x/state.pt")
    return aligner, problem


def _bad_on_call(n, value):
    def wrap(reward):
        calls = []

        def fn(samples):
            calls.append(1)
            out = reward(samples)
            return out * value if len(calls) == n else out
        return fn
    return wrap


@pytest.mark.parametrize("value, cause", [(float("inf"), r"reward \(inf\)"), (float("nan"), r"reward \(nan\)")])
def test_non_finite_reward_stops_the_step_before_the_update(value, cause):
    aligner, problem = _aligner(_bad_on_call(3, value))
    aligner.step(), aligner.step()
    before = [p.detach().clone() for p in problem.policy.trainable_parameters()]
    with pytest.raises(NonFiniteError, match=rf"step 3: non-finite {cause}; the last good state is kept in "
                                             r"results/align/x/state.pt"):
        aligner.step()
    assert aligner.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(before, problem.policy.trainable_parameters()))


def test_non_finite_gradient_stops_before_the_optimizer(monkeypatch):
    aligner, problem = _aligner(lambda reward: reward)
    real = torch.Tensor.backward

    def poisoned_backward(self, *args, **kwargs):
        real(self, *args, **kwargs)
        for p in problem.policy.trainable_parameters():
            p.grad.fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "backward", poisoned_backward)
    before = [p.detach().clone() for p in problem.policy.trainable_parameters()]
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite gradient_norm \(nan\)"):
        aligner.step()
    assert all(torch.equal(a, b) for a, b in zip(before, problem.policy.trainable_parameters()))
