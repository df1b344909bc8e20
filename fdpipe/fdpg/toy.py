"""An enumerable toy space where every f-DPG quantity has an exact value.

Vocabulary: token 0 is EOS (also used as padding), tokens ``1..m`` are content tokens, and
tokens ``m+1..m+C`` are the ``C`` prompts (contexts). A completion is at most ``L`` content
tokens followed by EOS (EOS is forced after ``L`` tokens), so each prompt has
``Σ_{k=0..L} m^k`` completions — 40 for the default ``m = 3, L = 3`` (a vocabulary of six
tokens with two prompts), 341 for ``m = 4, L = 4``.

`TabularLM` is a fully expressive autoregressive model: one row of logits per (prompt,
completion prefix). It is called exactly like a Hugging Face causal LM, so it runs behind
the same `fdpipe.models.policy.CausalPolicy` and `fdpipe.fdpg.aligner.Aligner` as the language-model
pipeline. `ToySpace` enumerates all completions and computes, with that same policy code,
the exact ``π``, ``a``, ``P``, ``Z``, ``D_f(π‖p)`` for every generator, ``KL(π‖a)``, the
constraint moments and (by autograd over the enumeration) the exact gradient of
``D_f(π‖p)``. `ToyProblem` bundles a space, a base, a policy, a reward table and a target
— everything the `Aligner` needs — and `build_problem` makes one from a few numbers.

Completions have texts too: content token ``k`` reads as the ``k``-th letter and a completion
is its letters separated by spaces (``"a c b"``; the whole text starts with ``p<c>:``), so
targets over named features (regex, word lists, reward thresholds) are computed by the same
`fdpipe.fdpg.features.FeatureScorer` as on the language model, once for the whole space
(`FeatureTable`).

Exact values are averages over prompts (uniform), like the sampled estimates of
`fdpipe.fdpg.estimators`, which average per-prompt estimates.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from fdpipe.fdpg import divergences
from fdpipe.fdpg.features import FeatureScorer
from fdpipe.models.policy import CausalPolicy, Samples
from fdpipe.fdpg.targets import LambdaFit, Target

EOS = 0


class TabularLM(nn.Module):
    """Autoregressive model with an independent logit vector for every (prompt, prefix).

    Inputs are ``[B, T]`` token ids whose first column is the prompt token (prompts are one
    token long) followed by completion tokens. The prefix of content tokens ``x_1..x_k`` is
    encoded as ``Σ_j x_j (m+1)^(j-1)``, unique across lengths because digits are ≥ 1. Logits
    of tokens that can never be generated (prompt tokens; content tokens after ``L`` content
    tokens) are ``-inf``.
    """

    def __init__(self, num_content: int, num_prompts: int, max_length: int, *, init_scale: float = 1.0,
                 eos_bias: float = 0.0, seed: int = 0):
        super().__init__()
        if num_content < 1 or num_prompts < 1 or max_length < 1:
            raise ValueError(f"TabularLM needs num_content, num_prompts, max_length >= 1, got "
                             f"{num_content}, {num_prompts}, {max_length}")
        self.m, self.num_prompts, self.max_length = num_content, num_prompts, max_length
        self.vocab_size = 1 + num_content + num_prompts
        self.states_per_prompt = (num_content + 1) ** max_length
        g = torch.Generator().manual_seed(seed)
        table = init_scale * torch.randn(num_prompts * self.states_per_prompt, 1 + num_content, generator=g,
                                         dtype=torch.float64)
        table[:, EOS] += eos_bias
        self.table = nn.Parameter(table.float())

    def prompt_token(self, c: int) -> int:
        return 1 + self.m + c

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        ids = input_ids.long()
        batch, width = ids.shape
        prompt = (ids[:, 0] - 1 - self.m).clamp(0, self.num_prompts - 1)
        content = torch.where((ids[:, 1:] >= 1) & (ids[:, 1:] <= self.m), ids[:, 1:], torch.zeros_like(ids[:, 1:]))
        radix = (self.m + 1) ** torch.arange(width - 1, device=ids.device).clamp(max=self.max_length - 1)
        codes = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=ids.device),
                           (content * radix).cumsum(-1)], dim=1).clamp(max=self.states_per_prompt - 1)
        rows = self.table[prompt[:, None] * self.states_per_prompt + codes]          # [B, T, 1+m]
        length = torch.arange(width, device=ids.device).expand(batch, width)
        forced = (length >= self.max_length)[..., None]
        eos_only = torch.full_like(rows, -math.inf)
        eos_only[..., EOS] = 0.0
        rows = torch.where(forced, eos_only, rows)
        prompts_block = torch.full((batch, width, self.num_prompts), -math.inf, dtype=rows.dtype, device=rows.device)
        return SimpleNamespace(logits=torch.cat([rows, prompts_block], dim=-1), past_key_values=None)


def make_policy(model: TabularLM) -> CausalPolicy:
    """`model` behind the `CausalPolicy` interface the alignment stage uses."""
    return CausalPolicy(model, eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=model.max_length + 1)


@dataclass
class ToyExact:
    """Exact quantities of one policy against one target, averaged over prompts.

    ``divergences`` maps every generator name to ``D_f(π‖p)``; ``constraint`` is
    ``E_π[φ]`` (``E_π[b]`` for pointwise, ``E_π[r]`` for rlhf) and ``constraint_target`` the
    same expectation under ``p``; entropies are of whole completions, in nats. For a target
    over features, ``features`` and ``features_target`` map each feature name to ``E_π[φ_k]``
    and ``E_p[φ_k]``.
    """

    log_pi: torch.Tensor          # [C, S] log π(x|c)
    log_a: torch.Tensor           # [C, S] log a(x|c)
    log_target: torch.Tensor      # [C, S] log P(x|c), unnormalised
    log_z: torch.Tensor           # [C] log Z(c)
    log_p: torch.Tensor           # [C, S] log p(x|c) = log P − log Z
    divergences: dict
    kl_pi_a: float
    kl_p_a: float
    constraint: float
    constraint_target: float
    reward_mean: float
    entropy: float
    entropy_target: float
    features: dict = field(default_factory=dict)
    features_target: dict = field(default_factory=dict)


@dataclass
class ToySpace:
    """All completions of every prompt, with exact computations through a `CausalPolicy`."""

    num_content: int = 3
    num_prompts: int = 2
    max_length: int = 3

    def __post_init__(self):
        self.sequences = [list(s) for k in range(self.max_length + 1)
                          for s in itertools.product(range(1, self.num_content + 1), repeat=k)]
        self._all_samples: Samples | None = None
        radix = self.num_content + 1
        self._code_to_index = torch.full((radix ** self.max_length,), -1, dtype=torch.long)
        for i, seq in enumerate(self.sequences):
            self._code_to_index[sum(x * radix ** j for j, x in enumerate(seq))] = i

    @property
    def size(self) -> int:
        """Completions per prompt."""
        return len(self.sequences)

    def make_model(self, *, init_scale: float = 1.0, eos_bias: float = 0.0, seed: int = 0) -> TabularLM:
        return TabularLM(self.num_content, self.num_prompts, self.max_length, init_scale=init_scale,
                         eos_bias=eos_bias, seed=seed)

    def completion_texts(self) -> list[str]:
        """The text of every completion (`sequences` order): its letters, space-separated."""
        return [" ".join(chr(ord("a") + x - 1) for x in seq) for seq in self.sequences]

    def prompt_tokens(self, model: TabularLM) -> list[list[int]]:
        return [[model.prompt_token(c)] for c in range(self.num_prompts)]

    def all_samples(self, model: TabularLM) -> Samples:
        """Every (prompt, completion + EOS) pair as a `Samples` batch, prompt-major order.

        Built once per space and reused (treat it as read-only).
        """
        if (model.m, model.num_prompts, model.max_length) != (self.num_content, self.num_prompts, self.max_length):
            raise ValueError(f"model of shape (m={model.m}, prompts={model.num_prompts}, L={model.max_length}) does "
                             f"not match the space (m={self.num_content}, prompts={self.num_prompts}, "
                             f"L={self.max_length})")
        if self._all_samples is None:
            self._all_samples = self._enumerate(model)
        return self._all_samples

    def _enumerate(self, model: TabularLM) -> Samples:
        rows = [[model.prompt_token(c)] + seq + [EOS] for c in range(self.num_prompts) for seq in self.sequences]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), EOS, dtype=torch.long)
        cmask = torch.zeros((len(rows), width), dtype=torch.bool)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            cmask[i, 1:len(row)] = True
            attn[i, :len(row)] = 1
        prompt_index = torch.arange(self.num_prompts).repeat_interleave(self.size)
        return Samples(input_ids=ids, attention_mask=attn, completion_mask=cmask, prompt_index=prompt_index,
                       prompt_keys=prompt_index.tolist(), sample_logprobs=torch.zeros(len(rows)), prompt_length=1)

    def prompt_index(self, samples: Samples) -> torch.Tensor:
        """Which prompt ``c`` each sample continues (``[B]``)."""
        return samples.input_ids[:, samples.prompt_length - 1].cpu() - 1 - self.num_content

    def sequence_index(self, samples: Samples) -> torch.Tensor:
        """Position in `sequences` of each sample's completion (``[B]``, EOS and padding ignored)."""
        ids = samples.input_ids[:, samples.prompt_length:].cpu()
        mask = samples.completion_mask[:, samples.prompt_length:].cpu()
        content = torch.where(mask & (ids >= 1) & (ids <= self.num_content), ids, torch.zeros_like(ids))
        if (content[:, self.max_length:] != 0).any():
            raise ValueError(f"a completion has more than {self.max_length} content tokens")
        content = content[:, :self.max_length]
        radix = (self.num_content + 1) ** torch.arange(content.shape[1])
        return self._code_to_index[(content * radix).sum(-1)]

    def log_probs(self, policy: CausalPolicy, *, grad: bool = False) -> torch.Tensor:
        """Exact ``log π(x|c)`` as a ``[C, S]`` float64 tensor (differentiable when `grad`)."""
        with torch.set_grad_enabled(grad):
            out = policy.score(self.all_samples(policy.model)).logprobs
        return out.double().reshape(self.num_prompts, self.size)

    def log_target(self, log_a: torch.Tensor, reward: torch.Tensor, target: Target,
                   phi: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised ``log P(x|c)`` for every completion (`phi` ``[C, S, K]`` over features)."""
        if target.over_features:
            flat = target.log_potential(reward.double().reshape(-1), phi.reshape(-1, phi.shape[-1]))
            return log_a + flat.reshape(log_a.shape)
        return log_a + target.log_potential(reward.double())

    @staticmethod
    def normalise(log_unnorm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p, log Z)`` per prompt from unnormalised log-probabilities ``[C, S]``."""
        log_z = torch.logsumexp(log_unnorm, dim=-1)
        return log_unnorm - log_z[:, None], log_z

    @staticmethod
    def divergence(name: str, log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Exact ``E_c D_f(π(·|c)‖p(·|c))`` (uniform over prompts)."""
        return torch.stack([divergences.exact(name, lp, lq) for lp, lq in zip(log_pi, log_p)]).mean()

    @staticmethod
    def kl(log_pi: torch.Tensor, log_ref: torch.Tensor) -> torch.Tensor:
        """Exact ``E_c KL(π‖ref)``."""
        return (torch.exp(log_pi) * (log_pi - log_ref)).sum(-1).mean()

    @staticmethod
    def expectation(log_pi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Exact ``E_c E_π[values]`` for a ``[C, S]`` table of values."""
        return (torch.exp(log_pi) * values.double()).sum(-1).mean()

    @staticmethod
    def entropy(log_pi: torch.Tensor) -> torch.Tensor:
        """Exact ``E_c H(π(·|c))`` over whole completions, in nats."""
        return -(torch.exp(log_pi) * log_pi).sum(-1).mean()

    def fit_lambda(self, target: Target, log_a: torch.Tensor, reward: torch.Tensor, *, tol: float = 1e-8,
                   phi: torch.Tensor | None = None) -> LambdaFit:
        """Fit λ of a distributional target exactly: ``E_c E_{p_λ(·|c)}[φ_k] = moment_k``.

        `fdpipe.fdpg.targets.Target.fit` on the whole enumeration with weights ``a(x|c)`` and
        one group per prompt (`phi` ``[C, S, K]`` for a target over features); sets ``target.lam``.
        """
        group = torch.arange(self.num_prompts).repeat_interleave(self.size)
        flat_phi = phi.reshape(-1, phi.shape[-1]) if phi is not None else None
        return target.fit(reward.double().reshape(-1), flat_phi, log_a.reshape(-1), group=group, tol=tol,
                          what="enumeration")

    def exact(self, policy: CausalPolicy, base: CausalPolicy, reward: torch.Tensor, target: Target,
              features: torch.Tensor | None = None) -> ToyExact:
        """Every exact quantity of `policy` against the target built from `base`, `reward` and the
        feature table `features` ``[C, S, K]`` (for a target over features)."""
        log_pi, log_a = self.log_probs(policy), self.log_probs(base)
        return self.exact_from_log_probs(log_pi, log_a, reward, target, features)

    def exact_from_log_probs(self, log_pi: torch.Tensor, log_a: torch.Tensor, reward: torch.Tensor,
                             target: Target, features: torch.Tensor | None = None) -> ToyExact:
        log_target = self.log_target(log_a, reward, target, features)
        log_p, log_z = self.normalise(log_target)
        if target.over_features:
            flat = features.reshape(-1, features.shape[-1])
            phi = target.constraint(reward.double().reshape(-1), flat).reshape(log_a.shape)
            per_feature = {name: features[..., k] for k, name in enumerate(target.feature_names)}
        else:
            phi, per_feature = target.constraint(reward.double()), {}
        return ToyExact(
            log_pi=log_pi, log_a=log_a, log_target=log_target, log_z=log_z, log_p=log_p,
            divergences={name: float(self.divergence(name, log_pi, log_p)) for name in divergences.NAMES},
            kl_pi_a=float(self.kl(log_pi, log_a)), kl_p_a=float(self.kl(log_p, log_a)),
            constraint=float(self.expectation(log_pi, phi)), constraint_target=float(self.expectation(log_p, phi)),
            reward_mean=float(self.expectation(log_pi, reward)),
            entropy=float(self.entropy(log_pi)), entropy_target=float(self.entropy(log_p)),
            features={n: float(self.expectation(log_pi, v)) for n, v in per_feature.items()},
            features_target={n: float(self.expectation(log_p, v)) for n, v in per_feature.items()},
        )

    def divergence_gradient(self, name: str, policy: CausalPolicy, log_p: torch.Tensor) -> torch.Tensor:
        """Exact ``∇_θ D_f(π_θ‖p)`` over the policy's trainable parameters, as one flat vector.

        Autograd through the enumeration: ``D_f`` is a finite sum over every completion.
        """
        params = policy.trainable_parameters()
        value = self.divergence(name, self.log_probs(policy, grad=True), log_p.detach())
        grads = torch.autograd.grad(value, params)
        return torch.cat([g.reshape(-1) for g in grads]).double()

    def reward_table(self, seed: int = 0) -> "RewardTable":
        return RewardTable(self, seed)


class RewardTable:
    """A fixed reward per (prompt, completion): standard normal, seeded; callable on `Samples`.

    ``values[c, i]`` is the reward of completion ``space.sequences[i]`` after prompt ``c``.
    """

    def __init__(self, space: ToySpace, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.space = space
        self.values = torch.randn(space.num_prompts, space.size, generator=g, dtype=torch.float64)

    def __call__(self, samples: Samples) -> torch.Tensor:
        reward = self.values[self.space.prompt_index(samples), self.space.sequence_index(samples)]
        return reward.to(samples.input_ids.device)


class FeatureTable:
    """The features of a target for every (prompt, completion), computed once by the
    `FeatureScorer` on the space's texts; callable on `Samples` like the `Aligner` wants.

    ``values[c, i, k]`` is feature k of completion ``space.sequences[i]`` after prompt ``c``
    (a reward feature reads `reward`'s table).
    """

    def __init__(self, space: ToySpace, specs, reward: RewardTable):
        self.space = space
        completions = space.completion_texts()
        scorer = FeatureScorer(specs)
        tables = [scorer.values(texts=[f"p{c}: {t}" for t in completions], completions=completions,
                                reward=reward.values[c]) for c in range(space.num_prompts)]
        self.values = torch.stack(tables)                       # [C, S, K] float64

    def __call__(self, samples: Samples, reward=None) -> torch.Tensor:
        phi = self.values[self.space.prompt_index(samples), self.space.sequence_index(samples)]
        return phi.to(samples.input_ids.device)


@dataclass
class ToyProblem:
    """A base ``a``, a trainable policy ``π_θ`` (a copy of ``a``), a reward table, a target and,
    for a target over features, their table."""

    space: ToySpace
    base: CausalPolicy
    policy: CausalPolicy
    reward: RewardTable
    target: Target
    lambda_fit: LambdaFit | None = field(default=None)
    features: FeatureTable | None = field(default=None)

    def prompt_keys(self) -> list[int]:
        return list(range(self.space.num_prompts))

    def prompt_tokens(self) -> list[list[int]]:
        return self.space.prompt_tokens(self.base.model)

    def exact(self, policy: CausalPolicy | None = None) -> ToyExact:
        """Exact quantities of `policy` (default: the trained policy) against the target."""
        return self.space.exact(self.policy if policy is None else policy, self.base, self.reward.values, self.target,
                                None if self.features is None else self.features.values)


def build_problem(space: ToySpace, target: Target, *, model_seed: int = 0, reward_seed: int = 0,
                  init_scale: float = 1.0, eos_bias: float = 0.0, fit_exactly: bool = True) -> ToyProblem:
    """A `ToyProblem` whose base is a random `TabularLM` and whose policy starts equal to it.

    A distributional target without λ is fitted exactly on the enumeration when
    `fit_exactly` (otherwise the `Aligner` fits it on samples of the base).
    """
    base_model = space.make_model(init_scale=init_scale, eos_bias=eos_bias, seed=model_seed)
    base_model.requires_grad_(False)
    policy_model = copy.deepcopy(base_model).requires_grad_(True)
    base, policy = make_policy(base_model), make_policy(policy_model)
    reward = RewardTable(space, seed=reward_seed)
    features = FeatureTable(space, target.feature_specs, reward) if target.over_features else None
    problem = ToyProblem(space=space, base=base, policy=policy, reward=reward, target=target, features=features)
    if target.kind == "distributional" and target.lam is None and fit_exactly:
        problem.lambda_fit = space.fit_lambda(target, space.log_probs(base), reward.values,
                                              phi=None if features is None else features.values)
    return problem
