"""The f-DPG training loop, independent of what the policy is.

`Aligner` composes the pieces — a policy and a frozen base (`fdpipe.models.policy.CausalPolicy`),
a reward function, a `fdpipe.fdpg.targets.Target`, the estimators and the update of
`fdpipe.fdpg.update` — into one step:

1. draw ``samples_per_prompt`` completions for ``prompts_per_step`` prompts from the
   proposal ``q`` (the policy itself, or a frozen copy of it with ``proposal: offline``);
2. score them: reward (and, for a target over features, the feature table ``φ`` ``[B, K]``,
   computed once per sample) → ``log P = log a + log_potential``;
3. training forward of the policy: ``log π_θ`` (and per-token entropy and KL to the base);
4. ``log Ẑ(c)`` per prompt from the weights ``P/q`` (pooled over steps for repeated prompts);
5. pseudo-rewards ``−f′(π_θ/p)``, baseline, surrogate loss, optimiser step;
6. metrics (see `fdpipe.fdpg.metrics.STEP_METRICS`); with an offline proposal, ``q`` is
   replaced by the policy when the policy is estimated to be closer to ``p``
   (``E_p[log q − log π_θ] < 0``).

Data-parallel (a `World` of several processes): each process samples its share of the step's
prompts (1) and scores its samples (2–3); steps 4–6 run on the pooled global batch
(`fdpipe.fdpg.metrics.pool`), each process backpropagates its share of the surrogate loss and
the gradients are summed, so every process makes the update one process would make.

The language-model stage (`fdpipe.stages.align`) and the exact toy space (`fdpipe.fdpg.toy`) both run
this class; only the policy, the reward function and the prompts differ.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass

import torch

import fdpipe_kernels

from fdpipe.common.errors import ConfigError
from fdpipe.fdpg import divergences, estimators, update
from fdpipe.fdpg.metrics import pool, step_metrics
from fdpipe.fdpg.targets import Target
from fdpipe.models import precision as precisions
from fdpipe.models.policy import CausalPolicy, Samples
from fdpipe.training import checkpoint, guards, optim
from fdpipe.training.distributed import World

@dataclass
class AlignConfig:
    """Hyperparameters of one f-DPG run (``alignment.runs.<name>`` in the config)."""

    divergence: str = "rkl"
    steps: int = 50
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    lr: float = 1e-5
    baseline: str = "loo"
    proposal: str = "online"          # online | offline
    grad_clip: float = 1.0
    fit_samples: int = 256            # samples of a used to fit λ of a distributional target
    fit_samples_per_prompt: int | None = None   # of them per prompt (None: samples_per_prompt)
    fit_tolerance: float = 1e-4
    token_kl: bool = True             # log kl_pi_a_tokens (one full-vocabulary pass over both models' logits)
    micro_batch_size: int | None = None   # sequences per forward (and backward) pass; None: the whole batch
    precision: str = "fp32"           # fp32 | bf16 (autocast of the forward passes, see fdpipe.models.precision)

    @classmethod
    def from_config(cls, cfg: dict, key: str) -> "AlignConfig":
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        out = cls(**known)
        if out.divergence not in divergences.NAMES:
            raise ConfigError(f"{key}.divergence", f"one of {', '.join(divergences.NAMES)}", out.divergence)
        if out.baseline not in update.BASELINES:
            raise ConfigError(f"{key}.baseline", f"one of {', '.join(update.BASELINES)}", out.baseline)
        if out.proposal not in ("online", "offline"):
            raise ConfigError(f"{key}.proposal", "online or offline", out.proposal)
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "fit_samples"):
            if int(getattr(out, name)) < 1:
                raise ConfigError(f"{key}.{name}", "a positive integer", getattr(out, name))
        if not out.lr > 0:
            raise ConfigError(f"{key}.lr", "a positive number", out.lr)
        per = out.fit_samples_per_prompt
        if per is not None and (not isinstance(per, int) or isinstance(per, bool) or per < 1):
            raise ConfigError(f"{key}.fit_samples_per_prompt", "a positive integer or null (samples_per_prompt)", per)
        mbs = out.micro_batch_size
        if mbs is not None and (not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 1):
            raise ConfigError(f"{key}.micro_batch_size", "a positive integer or null", mbs)
        out.precision = precisions.check(out.precision, f"{key}.precision")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def sample_rows(samples: Samples, rows: slice) -> Samples:
    """The samples in the row range `rows` (tensors are views; the padded width is kept)."""
    pick = lambda values: None if values is None else values[rows]
    return dataclasses.replace(samples, input_ids=samples.input_ids[rows], attention_mask=samples.attention_mask[rows],
                               completion_mask=samples.completion_mask[rows], prompt_index=samples.prompt_index[rows],
                               prompt_keys=samples.prompt_keys[rows], sample_logprobs=samples.sample_logprobs[rows],
                               texts=pick(samples.texts), completions=pick(samples.completions))


class PromptCycle:
    """Seeded, endless pass over a fixed list of prompts (reshuffled every epoch)."""

    def __init__(self, keys: list, token_lists: list[list[int]], seed: int):
        if not keys:
            raise ValueError("no prompts to train on")
        self.keys, self.tokens = list(keys), list(token_lists)
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def next_batch(self, n: int) -> tuple[list, list[list[int]]]:
        picked = []
        while len(picked) < n:
            if not self._order:
                self._order = torch.randperm(len(self.keys), generator=self.generator).tolist()
            picked.append(self._order.pop())
        return [self.keys[i] for i in picked], [self.tokens[i] for i in picked]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = list(state["order"])


class Aligner:
    """One f-DPG run: call `step()` repeatedly; `state_dict()` makes it resumable.

    Args:
        policy: the policy π_θ being trained (its trainable parameters are optimised).
        base: the frozen base ``a`` (the SFT model).
        reward_fn: ``Samples → tensor [B]`` of rewards (proxy reward model, or a table).
        target: the target EBM; a distributional target is fitted on first use.
        feature_fn: ``(Samples, rewards) → tensor [B, K]`` of the target's features (columns in
            ``target.feature_names`` order); required when the target is written over features.
        prompts: a `PromptCycle` (or anything with ``next_batch(n)``).
        cfg: `AlignConfig`.
        generator: torch generator for sampling (on the policy's device).
        gold_fn: optional ``Samples → tensor [B]`` gold reward, only reported.
        world: this process's place in a data-parallel job (alone by default).
        state_path: the resume state of the stage, named when a non-finite value stops training.
    """

    def __init__(self, policy: CausalPolicy, base: CausalPolicy, reward_fn, target: Target, prompts,
                 cfg: AlignConfig, *, generator: torch.Generator, gold_fn=None, feature_fn=None,
                 world: World = World(), state_path=None):
        if cfg.prompts_per_step < world.size:
            raise ConfigError("prompts_per_step", f"at least the number of processes ({world.size})",
                              cfg.prompts_per_step)
        if target.over_features and feature_fn is None:
            raise ValueError(f"the target {target.describe()} is written over features: give a feature_fn")
        self.policy, self.base, self.reward_fn, self.target = policy, base, reward_fn, target
        for model in (policy, base):   # sampling and scoring in micro-batches (None: whole batches)
            model.micro_batch_size = cfg.micro_batch_size
        self.feature_fn = feature_fn
        self.prompts, self.cfg, self.generator, self.gold_fn = prompts, cfg, generator, gold_fn
        self.world = world
        self.state_path = state_path   # the stage's resume state, named in errors
        self.optimizer = optim.adamw(policy.trainable_parameters(), cfg.lr)  # no weight decay: Adam
        self.log_z = estimators.RunningLogZ()
        self.proposal = self._frozen_copy(policy) if cfg.proposal == "offline" else None
        # on-policy with a frozen trunk shared by policy and base: sampling records the trunk's
        # hidden states and both scoring and training run only their heads on them
        self.share_trunk = (self.proposal is None and policy.uses_trunk and policy.trunk is base.trunk)
        self.step_count = 0
        self.lambda_fit = None

    @staticmethod
    def _frozen_copy(policy: CausalPolicy) -> CausalPolicy:
        clone = copy.copy(policy)
        clone.model = copy.deepcopy(policy.model).eval()
        clone.trunk = None   # the proposal's samples are scored with full forwards
        for p in clone.model.parameters():
            p.requires_grad_(False)
        return clone

    # ------------------------------------------------------------------ target
    def prepare_target(self) -> None:
        """Fit λ of a distributional target on samples of the base (self-normalised IS).

        The target is conditional, so the matched moment is the average over prompts of
        ``E_{p(·|c)}[φ]``: weights are normalised within each prompt (samples of a prompt drawn
        in several batches are pooled by prompt key). Pooling all prompts together would instead
        weight each prompt by its ``Z(c)``. A prompt's self-normalised moment is biased with few
        samples (a rare feature absent from all of a prompt's samples counts 0 whatever λ, so
        λ comes out too large): ``fit_samples_per_prompt`` draws more samples per prompt for
        the fit than a training step does; batches keep a step's number of rows. Data-parallel,
        each process samples its share of the prompts and the fit runs on the samples of every
        process. A moment the samples cannot reach stops here with a `ConfigError` naming it.
        """
        if self.target.kind != "distributional" or self.target.lam is not None:
            return
        cfg, world, target = self.cfg, self.world, self.target
        rewards, phis, groups, group_of_key = [], [], [], {}
        remaining = cfg.fit_samples
        per_prompt = cfg.fit_samples_per_prompt or cfg.samples_per_prompt
        batch_prompts = max(world.size, cfg.prompts_per_step * cfg.samples_per_prompt // per_prompt)  # rows of a step
        while remaining > 0:
            n_prompts = min(batch_prompts, math.ceil(remaining / per_prompt))
            keys, tokens = (world.shard(part) for part in self.prompts.next_batch(n_prompts))
            reward = torch.zeros(0, dtype=torch.float64, device=self.policy.device)
            phi, sample_keys = torch.zeros((0, len(target.features)), dtype=torch.float64, device=reward.device), []
            if keys:
                samples = self.base.sample(tokens, per_prompt, generator=self.generator, prompt_keys=keys)
                reward, sample_keys = self.reward_fn(samples).double(), samples.prompt_keys
                if target.over_features:
                    phi = self.feature_fn(samples, reward).double().to(reward.device)
            rewards.append(world.gather(reward))
            if target.over_features:
                phis.append(world.gather(phi))
            sample_keys = [k for part in world.gather_objects(list(sample_keys)) for k in part]
            groups.append(torch.tensor([group_of_key.setdefault(k, len(group_of_key)) for k in sample_keys]))
            remaining -= len(sample_keys)
        reward = torch.cat(rewards)
        phi = torch.cat(phis) if target.over_features else None
        self.lambda_fit = target.fit(reward, phi, torch.zeros_like(reward), group=torch.cat(groups).to(reward.device),
                                     tol=cfg.fit_tolerance, what=f"{len(reward)} fitting samples of the base")

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        """Sample this process's share of the step's prompts, then `learn` from the samples."""
        cfg = self.cfg
        self.prepare_target()
        t_start = time.perf_counter()
        keys, prompt_tokens = (self.world.shard(part) for part in self.prompts.next_batch(cfg.prompts_per_step))
        sampler = self.proposal if self.proposal is not None else self.policy
        samples = sampler.sample(prompt_tokens, cfg.samples_per_prompt, generator=self.generator, prompt_keys=keys,
                                 capture_trunk=self.share_trunk)
        t_sampled = time.perf_counter()
        metrics = self.learn(samples)
        metrics.update(time_sample_s=t_sampled - t_start, time_step_s=time.perf_counter() - t_start)
        return metrics

    def learn(self, samples: Samples) -> dict:
        """Score `samples` (this process's share of the step's batch), update the policy with the
        f-DPG gradient of the whole batch, and return the step's metrics."""
        cfg, policy, world = self.cfg, self.policy, self.world
        t_learn = time.perf_counter()
        reward = self.reward_fn(samples).to(torch.float64)
        guards.check(self.step_count + 1, self.state_path, reward=reward)
        if self.share_trunk:   # computed once here unless sampling recorded it
            policy.attach_trunk(samples)
        with torch.no_grad():
            base_out = self.base.score(samples, keep_logits=cfg.token_kl)
        log_a = base_out.logprobs.double()
        phi = None
        if self.target.over_features:
            phi = self.feature_fn(samples, reward).double().to(reward.device)
            log_target = log_a + self.target.log_potential(reward, phi).to(log_a.device)
        else:
            log_target = log_a + self.target.log_potential(reward).to(log_a.device)
        t_scored = time.perf_counter()

        policy.model.train()
        # with micro-batches the training forward/backward runs per micro-batch after the pooled
        # quantities are known (`_backward_in_micro_batches`); this pass only scores
        micro = cfg.micro_batch_size is not None and cfg.micro_batch_size < len(samples)
        with torch.no_grad() if micro else contextlib.nullcontext():
            scores = policy.score(samples, with_entropy=True, keep_logits=cfg.token_kl)
        log_pi = scores.logprobs
        log_pi_d = log_pi.detach().double()
        on_policy = self.proposal is None
        log_q = log_pi_d if on_policy else samples.sample_logprobs.double()

        values = {"log_pi": log_pi_d, "log_a": log_a, "log_target": log_target, "log_q": log_q, "reward": reward,
                  "sample_logprobs": samples.sample_logprobs.double(), "length": samples.lengths().double()}
        if cfg.token_kl:
            with torch.no_grad():
                tok_div = fdpipe_kernels.token_divergences(scores.logits.detach(), base_out.logits,
                                                           mask=samples.completion_mask[:, 1:])
            values["kl_tokens"] = tok_div.kl_pi_ref.double().sum(-1)
        if self.gold_fn is not None:
            values["gold"] = self.gold_fn(samples).double().to(log_pi_d.device)
        if phi is not None:
            values["phi"] = phi
        totals = {"entropy": scores.entropy.detach().sum(), "tokens": samples.completion_mask[:, 1:].sum()}
        batch = pool(world, samples, values, totals)
        v, group, n_groups = batch.values, batch.group, batch.num_groups

        log_z = self.log_z.update(batch.keys, v["log_target"] - v["log_q"])
        rewards = update.pseudo_rewards(cfg.divergence, v["log_pi"], v["log_target"], log_z)
        advantages = (rewards - update.baseline(rewards, group, n_groups, cfg.baseline))[batch.mine]
        weights = None if on_policy else torch.exp(log_pi_d - log_q)     # π/q of this rank's samples
        if micro:
            loss = self._backward_in_micro_batches(samples, advantages, weights, len(samples) / len(batch))
        else:
            loss = update.surrogate_loss(log_pi, advantages, weights)
            guards.check(self.step_count + 1, self.state_path, loss=loss.detach())
            if world.size > 1:   # this rank's share of the whole batch's mean
                loss = loss * (len(samples) / len(batch))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        world.sum_gradients(policy.trainable_parameters())
        grad_norm = optim.clipped_step(self.optimizer, policy.trainable_parameters(), cfg.grad_clip,
                                       step=self.step_count + 1, state_path=self.state_path)
        t_trained = time.perf_counter()

        batch.totals["loss"] = world.sum(loss.detach())
        metrics = step_metrics(batch, divergence=cfg.divergence, log_z=log_z, rewards=rewards, grad_norm=grad_norm,
                               constraint=self.target.constraint(v["reward"], v.get("phi")), target=self.target,
                               on_policy=on_policy)
        replaced = 0.0
        if not on_policy:
            replaced = float(self._maybe_replace_proposal(v["log_pi"], v["log_target"], v["log_q"], group, n_groups))
        metrics.update(proposal_replaced=replaced, time_sample_s=0.0, time_score_s=t_scored - t_learn,
                       time_train_s=t_trained - t_scored, time_step_s=time.perf_counter() - t_learn)
        self.step_count += 1
        metrics["step"] = self.step_count
        return metrics

    def _backward_in_micro_batches(self, samples: Samples, advantages, weights, share: float) -> torch.Tensor:
        """Accumulate the gradient of the surrogate loss over micro-batches of `samples`.

        Advantages and importance weights come from the whole (global) batch and are constants
        here; micro-batch ``m`` of ``n_m`` of this process's ``n`` samples contributes
        ``surrogate_loss(m) · n_m / n · share`` (``share``: this process's part of the global
        batch), so the losses add up to the whole batch's loss and the gradients to its
        gradient. Returns that sum (detached).
        """
        size, n = self.cfg.micro_batch_size, len(samples)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=advantages.device)
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            log_pi = self.policy.score(sample_rows(samples, rows)).logprobs
            loss = update.surrogate_loss(log_pi, advantages[rows], None if weights is None else weights[rows])
            guards.check(self.step_count + 1, self.state_path, loss=loss.detach())
            loss = loss * ((rows.stop - rows.start) / n * share)
            loss.backward()
            total = total + loss.detach()
        return total

    def _maybe_replace_proposal(self, log_pi, log_target, log_q, group, n_groups) -> bool:
        """Replace q by π_θ when ``E_p[log q − log π_θ] < 0`` (self-normalised per prompt)."""
        log_w = log_target - log_q
        log_norm = estimators.group_logsumexp(log_w, group, n_groups)[group]
        p_weights = torch.exp(log_w - log_norm)            # sums to 1 within each prompt
        gain = torch.zeros(n_groups, dtype=torch.float64, device=log_pi.device).index_add_(
            0, group, p_weights * (log_q - log_pi)).mean()
        if gain < 0:
            self.proposal = self._frozen_copy(self.policy)
            return True
        return False

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """What changes while training: the policy's trainable parameters (and the offline
        proposal's values of them), optimizer, Z estimates, λ, prompt order and RNG streams."""
        trained = [n for n, p in self.policy.model.named_parameters() if p.requires_grad]
        return {
            "step": self.step_count,
            "policy": checkpoint.trainable_tensors(self.policy.model, trained),
            "proposal": (checkpoint.trainable_tensors(self.proposal.model, trained)
                         if self.proposal is not None else None),
            "optimizer": self.optimizer.state_dict(),
            "log_z": self.log_z.state_dict(),
            "lambda": self.target.lam,
            "prompts": self.prompts.state_dict() if hasattr(self.prompts, "state_dict") else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict, source="state") -> None:
        """Restore `state_dict()`; `source` (the state file) is named in errors."""
        self.step_count = int(state["step"])
        checkpoint.load_tensors(self.policy.model, state["policy"], source)
        if state.get("proposal") is not None:
            if self.proposal is None:
                self.proposal = self._frozen_copy(self.policy)
            checkpoint.load_tensors(self.proposal.model, state["proposal"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.log_z.load_state_dict(state["log_z"])
        self.target.lam = state["lambda"]
        if state.get("prompts") is not None and hasattr(self.prompts, "load_state_dict"):
            self.prompts.load_state_dict(state["prompts"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
