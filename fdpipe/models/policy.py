"""An autoregressive policy: ancestral sampling and sequence log-probabilities.

`CausalPolicy` wraps any module that maps token ids ``[B, T]`` to an output with
``.logits`` ``[B, T, V]`` — a Hugging Face causal LM or the enumerable toy model of
`fdpipe.fdpg.toy` — so the alignment loop runs the same code on both. Every log-probability
goes through the public functions of `fdpipe_kernels`.

Conventions
-----------
* Prompts are padded on the left, completions on the right; position ids come from the
  attention mask so that padding never shifts a token's position.
* A completion ends with its EOS token (included and scored) or at ``max_new_tokens``.
* Sampling is pure ancestral sampling (temperature 1, no top-k/top-p), so the recorded
  log-probabilities are the policy's true probabilities of the sampled sequences.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

import fdpipe_kernels

from fdpipe.models import precision as precisions


@dataclass
class Samples:
    """A batch of sampled completions with everything needed to score and train on them."""

    input_ids: torch.Tensor          # [B, T] prompt (left-padded) + completion (right-padded)
    attention_mask: torch.Tensor     # [B, T] 1 on real tokens
    completion_mask: torch.Tensor    # [B, T] bool, True on completion tokens (EOS included)
    prompt_index: torch.Tensor       # [B] index of the prompt within the batch (groups for Z)
    prompt_keys: list                # [B] stable identifier of each sample's prompt
    sample_logprobs: torch.Tensor    # [B] log π(x|c) recorded while sampling
    prompt_length: int               # T_prompt: completions start at this column
    texts: list | None = None        # decoded prompt + completion, when a tokenizer is known
    completions: list | None = None  # decoded completion only
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_index.max().item()) + 1 if len(self) else 0

    def completion_ids(self) -> list[list[int]]:
        """Completion token ids of each sample (EOS included when generated)."""
        out = []
        for row, mask in zip(self.input_ids.tolist(), self.completion_mask.tolist()):
            out.append([t for t, m in zip(row, mask) if m])
        return out

    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of ``probs`` ``[B, V]`` by inverting the CDF (exact, zero-probability
    entries are never drawn); much faster on CPU than `torch.multinomial` for large V."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each sequence's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, T], mask [B, T])``."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class SequenceScores:
    """Per-sequence outputs of a training forward pass."""

    logprobs: torch.Tensor          # [B] Σ log π over completion tokens (differentiable)
    token_logprobs: torch.Tensor    # [B, T-1] per-token log π (0 off the completion)
    entropy: torch.Tensor | None    # [B, T-1] per-token entropy (0 off the completion)
    logits: torch.Tensor | None     # [B, T-1, V] when asked for


class CausalPolicy:
    """Sampling and scoring for a causal LM.

    Args:
        model: module called as ``model(input_ids=..., attention_mask=..., position_ids=...,
            cache=... (or past_key_values=...), use_cache=...)`` returning an object with
            ``.logits`` (and ``.cache``/``.past_key_values`` when it supports incremental decoding).
        eos_token_id: token that ends a completion.
        pad_token_id: token used for padding (never scored).
        max_new_tokens: longest completion.
        tokenizer: optional, to decode texts.
        precision: ``fp32`` or ``bf16``: forward passes run under `fdpipe.models.precision.autocast`
            (the logits are upcast to float32 before any log-probability).
        micro_batch_size: at most this many sequences per forward pass in `sample` and `score`
            (None: the whole batch at once); the results do not depend on it.
        trunk: optional `fdpipe.models.trunk.TrunkSplit` shared with other policies: sampling can
            record the trunk's hidden states and `score` then runs only this model's head on
            them (see `sample`'s ``capture_trunk``). Used in float32 without micro-batches only
            (`uses_trunk`); otherwise every forward pass is a full one.
    """

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int,
                 tokenizer=None, precision: str = "fp32", micro_batch_size: int | None = None, trunk=None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = tokenizer
        self.precision = precision
        self.micro_batch_size = micro_batch_size
        self.trunk = trunk
        self.share_prefill = True   # one prefill per prompt (False: one per sample, for comparisons)
        self._cache_kwarg: str | None = None
        self._keep_kwarg = False

    @classmethod
    def for_tokenizer(cls, model, tokenizer, *, max_new_tokens: int, decode: bool = True, **options) -> "CausalPolicy":
        """A policy whose EOS and pad tokens are the tokenizer's; `decode` fills the texts of
        its samples (the tokenizer is only used for that); `options`: precision,
        micro_batch_size, trunk."""
        return cls(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   max_new_tokens=max_new_tokens, tokenizer=tokenizer if decode else None, **options)

    @property
    def uses_trunk(self) -> bool:
        """True when the shared trunk is used: a trunk is set, float32, no micro-batches."""
        return self.trunk is not None and self.precision in ("fp32", None) and self.micro_batch_size is None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self):
        return self.model.parameters()

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _call(self, input_ids, attention_mask, position_ids, past=None, use_cache=False, last_only=False):
        """Forward pass; returns ``(logits, cache)`` (cache is None for models without one).

        ``last_only`` asks models that support it (``logits_to_keep``) for the last position's
        logits only, which is all sampling needs.
        """
        if self._cache_kwarg is None:
            params = inspect.signature(self.model.forward).parameters
            self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
            self._keep_kwarg = "logits_to_keep" in params
        extra = {"logits_to_keep": 1} if last_only and self._keep_kwarg else {}
        with precisions.autocast(self.precision, input_ids.device):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **{self._cache_kwarg: past}, **extra)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return precisions.upcast(out.logits), cache

    def _row_chunks(self, batch: int) -> list[slice]:
        """Row ranges of at most `micro_batch_size` sequences (one range without it)."""
        size = self.micro_batch_size or batch
        return [slice(start, min(start + size, batch)) for start in range(0, max(batch, 1), size)]

    def _call_chunked(self, input_ids, attention_mask, position_ids, pasts, last_only=False):
        """`_call` with caches on each row range of `_row_chunks`; returns the logits of every
        row and the list of per-range caches (one range: exactly `_call`)."""
        chunks = self._row_chunks(input_ids.shape[0])
        pasts = pasts if pasts is not None else [None] * len(chunks)
        outs = [self._call(input_ids[rows], attention_mask[rows], position_ids[rows], past=past, use_cache=True,
                           last_only=last_only) for rows, past in zip(chunks, pasts)]
        logits = outs[0][0] if len(outs) == 1 else torch.cat([o[0] for o in outs], dim=0)
        caches = [o[1] for o in outs]
        return logits, (caches if all(c is not None for c in caches) else None)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[list[int]], num_samples: int, *, generator: torch.Generator,
               prompt_keys: list | None = None, capture_trunk: bool = False) -> Samples:
        """Draw `num_samples` completions for each prompt (token lists) by ancestral sampling.

        Each prompt is encoded once (one prefill per prompt); its KV cache and last logits are
        then repeated for its `num_samples` rows. With `capture_trunk` and a `trunk`, the hidden
        states entering the trunk's first head block, which the decoding computes anyway, are
        kept for every position in ``samples.extra["trunk_hidden"]`` ``[B, T, H]`` (zeros on
        padding and on the last token, which is never fed), so that `score` of a policy sharing
        the trunk runs its head only.
        """
        device = self.device
        keys = list(prompt_keys) if prompt_keys is not None else list(range(len(prompts)))
        sample_keys = [k for k in keys for _ in range(num_samples)]
        prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(num_samples)
        prompt_ids, prompt_attn = left_pad(prompts, self.pad_token_id, device)
        ids, attn = prompt_ids[prompt_index], prompt_attn[prompt_index]
        batch, prompt_len = ids.shape
        positions = position_ids_from_mask(attn)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        new_tokens, new_mask = [], []
        capture = capture_trunk and self.uses_trunk
        # micro-batches: each row range runs with its own cache (no shared prefill); the draws
        # below stay those of the whole batch, so the samples do not depend on micro_batch_size
        chunked = len(self._row_chunks(batch)) > 1
        was_training = self.model.training
        self.model.eval()
        try:
            with (self.trunk.capture(self.model) if capture else contextlib.nullcontext([])) as chunks:
                if chunked:
                    logits, past = self._call_chunked(ids, attn, positions, None, last_only=True)
                else:
                    logits, past = self._prefill(prompt_ids, prompt_attn, num_samples, ids, attn, chunks)
                for step in range(self.max_new_tokens):
                    if step > 0 and chunked:
                        logits, past = self._call_chunked(step_ids, attn, step_pos, past, last_only=True)
                    elif step > 0:
                        logits, past = self._call(step_ids, attn, step_pos, past=past, use_cache=True,
                                                  last_only=True)
                    logits = logits[:, -1, :]
                    token = sample_categorical(torch.softmax(logits.double(), dim=-1), generator)
                    token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
                    lp = fdpipe_kernels.token_logprobs(logits, token)
                    total = total + torch.where(finished, torch.zeros_like(lp), lp)
                    new_tokens.append(token)
                    new_mask.append(~finished)
                    attn = torch.cat([attn, (~finished).long()[:, None]], dim=1)
                    next_pos = positions[:, -1:] + 1
                    positions = torch.cat([positions, next_pos], dim=1)
                    finished = finished | (token == self.eos_token_id)
                    if past is not None:
                        step_ids, step_pos = token[:, None], next_pos
                    else:
                        step_ids = torch.cat([ids] + [t[:, None] for t in new_tokens], dim=1)
                        step_pos = positions
                    if bool(finished.all()):
                        break
        finally:
            self.model.train(was_training)
        completion = torch.stack(new_tokens, dim=1)
        cmask = torch.stack(new_mask, dim=1)
        input_ids = torch.cat([ids, completion], dim=1)
        completion_mask = torch.cat([torch.zeros_like(ids, dtype=torch.bool), cmask], dim=1)
        samples = Samples(input_ids=input_ids, attention_mask=attn, completion_mask=completion_mask,
                          prompt_index=prompt_index, prompt_keys=sample_keys, sample_logprobs=total,
                          prompt_length=prompt_len)
        if capture and chunks:
            samples.extra.update(self._trunk_states(chunks, attn))
        if self.tokenizer is not None:
            self.decode(samples)
        return samples

    def _prefill(self, prompt_ids, prompt_attn, num_samples, ids, attn, chunks):
        """Logits and cache after the prompts, for every sample row: computed once per prompt
        and repeated `num_samples` times when the cache can be repeated (or there is none)."""
        if num_samples == 1 or not self.share_prefill:
            return self._call(ids, attn, position_ids_from_mask(attn), use_cache=True, last_only=True)
        logits, past = self._call(prompt_ids, prompt_attn, position_ids_from_mask(prompt_attn),
                                  use_cache=True, last_only=True)
        if past is not None and not hasattr(past, "batch_repeat_interleave"):
            chunks.clear()   # a cache that cannot be repeated: prefill every row
            return self._call(ids, attn, position_ids_from_mask(attn), use_cache=True, last_only=True)
        if past is not None:
            past.batch_repeat_interleave(num_samples)
        for i, chunk in enumerate(chunks):
            chunks[i] = chunk.repeat_interleave(num_samples, dim=0)
        return logits.repeat_interleave(num_samples, dim=0), past

    def _trunk_states(self, chunks, attention_mask) -> dict:
        """The recorded trunk outputs as one ``[B, T, H]`` tensor (zeros where masked)."""
        hidden = torch.cat(chunks, dim=1)
        width = attention_mask.shape[1]
        if hidden.shape[1] < width:   # the last sampled token is never fed
            pad = hidden.new_zeros(hidden.shape[0], width - hidden.shape[1], hidden.shape[2])
            hidden = torch.cat([hidden, pad], dim=1)
        hidden = torch.where(attention_mask[:, :, None].bool(), hidden, torch.zeros_like(hidden))
        return {"trunk_hidden": hidden, "trunk": self.trunk}

    def attach_trunk(self, samples: Samples) -> Samples:
        """Compute the trunk's hidden states of `samples` (once) when sampling did not record them."""
        if self.uses_trunk and samples.extra.get("trunk") is not self.trunk:
            hidden = self.trunk.trunk(samples.input_ids, samples.attention_mask,
                                      position_ids_from_mask(samples.attention_mask))
            samples.extra.update(trunk_hidden=hidden, trunk=self.trunk)
        return samples

    def decode(self, samples: Samples) -> Samples:
        """Fill `samples.texts` (prompt + completion) and `samples.completions`, EOS stripped."""
        tok = self.tokenizer
        texts, completions = [], []
        for row, amask, cmask in zip(samples.input_ids.tolist(), samples.attention_mask.tolist(),
                                     samples.completion_mask.tolist()):
            prompt = [t for t, a, c in zip(row, amask, cmask) if a and not c]
            comp = [t for t, c in zip(row, cmask) if c and t != self.eos_token_id]
            completions.append(tok.decode(comp, skip_special_tokens=True))
            texts.append(tok.decode(prompt + comp, skip_special_tokens=True))
        samples.texts, samples.completions = texts, completions
        return samples

    # ------------------------------------------------------------------ scoring
    def score(self, samples: Samples, *, with_entropy: bool = False, keep_logits: bool = False) -> SequenceScores:
        """Log-probabilities of the completions (differentiable when grad is enabled).

        When `samples` carry the hidden states of this policy's trunk (``extra["trunk"]`` is
        ``self.trunk``), only the head runs on them, and the LM head only on completion
        positions (unless `keep_logits`); otherwise the full model runs, on row ranges of at
        most `micro_batch_size` sequences.
        """
        if not (self.uses_trunk and samples.extra.get("trunk") is self.trunk):
            parts = [self._score_rows(samples.input_ids[rows], samples.attention_mask[rows],
                                      samples.completion_mask[rows], with_entropy, keep_logits)
                     for rows in self._row_chunks(len(samples))]
            if len(parts) == 1:
                return parts[0]
            cat = lambda name: (None if getattr(parts[0], name) is None
                                else torch.cat([getattr(p, name) for p in parts], dim=0))
            return SequenceScores(logprobs=cat("logprobs"), token_logprobs=cat("token_logprobs"),
                                  entropy=cat("entropy"), logits=cat("logits"))
        targets = samples.input_ids[:, 1:]
        mask = samples.completion_mask[:, 1:]
        attn = samples.attention_mask
        final = self.trunk.head(self.model, samples.extra["trunk_hidden"], attn, position_ids_from_mask(attn))
        final = final[:, :-1]
        head = self.model.lm_head
        if not keep_logits:
            return self._linear_scores(final[mask], head, targets[mask], mask, with_entropy)
        return self._token_scores(head(final), targets, mask, with_entropy, keep_logits)

    def _score_rows(self, input_ids, attention_mask, completion_mask, with_entropy, keep_logits) -> SequenceScores:
        """Scores of some rows through the full model."""
        logits, _ = self._call(input_ids, attention_mask, position_ids_from_mask(attention_mask))
        return self._token_scores(logits[:, :-1, :], input_ids[:, 1:], completion_mask[:, 1:], with_entropy,
                                  keep_logits)

    @staticmethod
    def _token_scores(logits, targets, mask, with_entropy, keep_logits) -> SequenceScores:
        """Scores from the logits ``[B, T-1, V]`` predicting `targets` where `mask` is set."""
        masked_targets = torch.where(mask, targets, torch.full_like(targets, -100))
        if with_entropy:
            tok_lp, entropy = fdpipe_kernels.token_logprobs(logits, masked_targets, with_entropy=True)
            entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
        else:
            tok_lp, entropy = fdpipe_kernels.token_logprobs(logits, masked_targets), None
        return SequenceScores(logprobs=tok_lp.sum(-1), token_logprobs=tok_lp, entropy=entropy,
                              logits=logits if keep_logits else None)

    @staticmethod
    def _linear_scores(hidden, head, targets, mask, with_entropy) -> SequenceScores:
        """Scores from the final hidden states of the completion positions through the LM head."""
        out = fdpipe_kernels.linear_token_logprobs(hidden, head.weight, targets, bias=getattr(head, "bias", None),
                                                   with_entropy=with_entropy)
        picked, ent = out if with_entropy else (out, None)
        tok_lp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
        entropy = None
        if ent is not None:
            entropy = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).masked_scatter(mask, ent.detach())
        return SequenceScores(logprobs=tok_lp.sum(-1), token_logprobs=tok_lp, entropy=entropy, logits=None)
