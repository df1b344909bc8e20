"""Which examples each optimizer step sees: a pure function of (step, seed).

Because the batch of step ``s`` depends on nothing but ``s``, the data and the seed, a resumed
run sees exactly the batches an uninterrupted one would. Two orders are offered:

* `epoch_batches`: seeded permutations of the data laid end to end (a batch may straddle two
  epochs; every example is seen once per epoch);
* `length_bucketed_batches`: each epoch drops its last incomplete batch, groups examples of
  similar length into batches (less padding) and shuffles the batches.

Inside a batch, `length_groups` cuts the rows into groups of similar length and
`padded_groups` cuts a padded batch accordingly, each group padded only to its own longest
row: the same examples and the same loss, with less work on pad tokens.
"""
from __future__ import annotations

import numpy as np
import torch

BUCKET_BATCHES = 50  # batches per length bucket (see length_bucketed_batches)
GROUP_OVERHEAD_TOKENS = 64  # what one more forward pass costs, in padded tokens (see length_groups)


def epoch_batches(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Example indices of step `step`: epochs of permutations seeded by (seed, epoch), end to end."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in one epoch of `n` examples (at least 1)."""
    return max(1, n // batch_size)


def length_bucketed_batches(step: int, lengths, batch_size: int, seed: int) -> torch.Tensor:
    """Example indices of step `step` among ``len(lengths)`` examples.

    Each epoch is a permutation drawn from a generator seeded by (seed, epoch), cut after its
    last full batch into chunks of `BUCKET_BATCHES` batches; each chunk is sorted by `lengths`
    and cut into batches, and the epoch's batches are shuffled.
    """
    lengths = torch.as_tensor(lengths)
    n = len(lengths)
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, j = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)[:per_epoch * batch_size]
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches += list(part.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return batches[order[j]]


def micro_batches(n: int, micro_batch_size: int | None) -> list[slice]:
    """Row ranges that cut a batch of `n` rows into micro-batches of at most
    `micro_batch_size` rows (None: one range, the whole batch)."""
    size = micro_batch_size or max(n, 1)
    return [slice(start, min(start + size, n)) for start in range(0, max(n, 1), size)]


def length_groups(lengths, max_rows: int | None = None,
                  overhead: int = GROUP_OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Rows of a batch cut into groups of similar length: row indices per group, longest first.

    The rows are sorted by length and cut into consecutive runs minimising the padded tokens
    (each group padded to its longest row) plus `overhead` tokens per group, the price of one
    more forward pass; a group holds at most `max_rows` rows (None: no limit). Every row is in
    exactly one group. Exact dynamic programming over the sorted lengths (O(n²), n = rows).
    """
    lengths = torch.as_tensor(lengths)
    n = len(lengths)
    if n == 0:
        return []
    order = torch.argsort(-lengths, stable=True)
    sorted_len = lengths[order].tolist()
    limit = max_rows or n
    best = [0.0] + [float("inf")] * n   # best[j]: cost of grouping the j longest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - limit), j):   # group = sorted rows i..j-1, padded to sorted_len[i]
            cost = best[i] + (j - i) * sorted_len[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def padded_groups(batch, max_rows: int | None = None) -> list[tuple[torch.Tensor, dict]]:
    """A padded batch (tensors ``[B, T]`` with an ``attention_mask``) in groups of rows of
    similar length (`length_groups`), each cut to the columns its rows use: padding sits at one
    end of every row, so they are one contiguous range. Returns (row indices, sub-batch) pairs."""
    mask = batch["attention_mask"]
    groups = []
    for rows in length_groups(mask.sum(dim=1), max_rows):
        used = mask[rows].any(dim=0)
        groups.append((rows, {key: value[rows][:, used] for key, value in batch.items()}))
    return groups
