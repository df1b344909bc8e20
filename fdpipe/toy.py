"""An enumerable toy space where every f-DPG quantity has an exact value.

Vocabulary: token 0 is EOS (also used as padding), tokens ``1..m`` are content tokens, and
tokens ``m+1..m+C`` are the ``C`` prompts (contexts). A completion is at most ``L`` content
tokens followed by EOS (EOS is forced after ``L`` tokens), so each prompt has
``Σ_{k=0..L} m^k`` completions — 341 for ``m = 4, L = 4``.

`TabularLM` is a fully expressive autoregressive model: one row of logits per (prompt,
completion prefix). It is called exactly like a Hugging Face causal LM, so it runs behind
the same `fdpipe.policy.CausalPolicy` and `fdpipe.alignment.Aligner` as the language-model
pipeline; `ToySpace` enumerates all completions and computes exact ``π``, ``a``, ``P``,
``Z``, ``D_f(π‖p)`` (and, by autograd, its exact gradient) with the same policy code.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from . import divergences
from .policy import CausalPolicy, Samples
from .targets import Target

EOS = 0


class TabularLM(nn.Module):
    """Autoregressive model with an independent logit vector for every (prompt, prefix).

    Inputs are ``[B, T]`` token ids whose first column is the prompt token (prompts are one
    token long) followed by completion tokens. The prefix of content tokens ``x_1..x_k`` is
    encoded as ``Σ_j x_j (m+1)^(j-1)``, unique across lengths because digits are ≥ 1.
    """

    def __init__(self, num_content: int, num_prompts: int, max_length: int, *, init_scale: float = 1.0,
                 eos_bias: float = 0.0, seed: int = 0):
        super().__init__()
        self.m, self.num_prompts, self.max_length = num_content, num_prompts, max_length
        self.vocab_size = 1 + num_content + num_prompts
        self.states_per_prompt = (num_content + 1) ** max_length + 1
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
    return CausalPolicy(model, eos_token_id=EOS, pad_token_id=EOS, max_new_tokens=model.max_length + 1)


@dataclass
class ToySpace:
    """All completions of every prompt, with exact computations through a `CausalPolicy`."""

    num_content: int = 4
    num_prompts: int = 2
    max_length: int = 4

    def __post_init__(self):
        self.sequences = [list(s) for k in range(self.max_length + 1)
                          for s in itertools.product(range(1, self.num_content + 1), repeat=k)]

    @property
    def size(self) -> int:
        return len(self.sequences)

    def prompt_tokens(self, model: TabularLM) -> list[list[int]]:
        return [[model.prompt_token(c)] for c in range(self.num_prompts)]

    def all_samples(self, model: TabularLM) -> Samples:
        """Every (prompt, completion + EOS) pair as a `Samples` batch, prompt-major order."""
        rows = [[model.prompt_token(c)] + seq + [EOS] for c in range(self.num_prompts) for seq in self.sequences]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), EOS, dtype=torch.long)
        cmask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            cmask[i, 1:len(row)] = True
        attn = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            attn[i, :len(row)] = 1
        prompt_index = torch.arange(self.num_prompts).repeat_interleave(self.size)
        return Samples(input_ids=ids, attention_mask=attn, completion_mask=cmask, prompt_index=prompt_index,
                       prompt_keys=prompt_index.tolist(), sample_logprobs=torch.zeros(len(rows)), prompt_length=1)

    def log_probs(self, policy: CausalPolicy, *, grad: bool = False) -> torch.Tensor:
        """Exact ``log π(x|c)`` as a ``[C, S]`` float64 tensor (differentiable when `grad`)."""
        with torch.set_grad_enabled(grad):
            out = policy.score(self.all_samples(policy.model)).logprobs
        return out.double().reshape(self.num_prompts, self.size)

    def log_target(self, log_a: torch.Tensor, reward: torch.Tensor, target: Target) -> torch.Tensor:
        """Unnormalised ``log P(x|c)`` for every completion."""
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

    def reward_table(self, model: TabularLM, seed: int = 0) -> "RewardTable":
        return RewardTable(self, model, seed)


class RewardTable:
    """A fixed reward per (prompt, completion): standard normal, seeded; callable on `Samples`."""

    def __init__(self, space: ToySpace, model: TabularLM, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.values = torch.randn(space.num_prompts, space.size, generator=g, dtype=torch.float64)
        self.index = {tuple(seq): i for i, seq in enumerate(space.sequences)}
        self.model = model

    def __call__(self, samples: Samples) -> torch.Tensor:
        prompts = (samples.input_ids[:, samples.prompt_length - 1] - 1 - self.model.m).tolist()
        out = []
        for c, comp in zip(prompts, samples.completion_ids()):
            content = tuple(t for t in comp if t != EOS)
            out.append(self.values[c, self.index[content]])
        return torch.stack(out)

