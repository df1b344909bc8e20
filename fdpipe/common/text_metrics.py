"""Diversity of generated text: distinct-n and self-BLEU.

Both work on words: a text is lower-cased and split into runs of word characters and single
punctuation marks (``"Great, fun!"`` → ``great , fun !``), so they do not depend on any
model's tokenizer.

* ``distinct_n`` (Li et al., 2016): distinct n-grams over all n-grams of the corpus, pooled
  over texts. 1 means no n-gram repeats anywhere; low values mean repetitive generations.
* ``self_bleu`` (Zhu et al., 2018): the mean over texts of the BLEU score of each text
  against all *other* texts as references. High values mean the texts resemble each other
  (low diversity).

BLEU (Papineni et al., 2002) here is sentence-level: the geometric mean of the clipped
n-gram precisions ``p_1..p_N`` (uniform weights) times the brevity penalty
``min(1, exp(1 − r/c))`` with ``c`` the hypothesis length and ``r`` the reference length
closest to it (the shorter one on ties). A precision with no match is smoothed to
``epsilon / (number of hypothesis n-grams)`` (method 1 of Chen & Cherry, 2014), so one
missing 4-gram does not zero the score; a hypothesis shorter than ``n`` words has no
n-grams and scores 0.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of `text`."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of `tokens` (empty when there are fewer than n tokens)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all `texts` (NaN when there is no n-gram)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set = set()
    total = 0
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


def sentence_bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                  epsilon: float = 0.1) -> float:
    """Smoothed BLEU of one tokenized hypothesis against tokenized references (see module doc)."""
    ref_counts = [[Counter(ngrams(ref, n)) for ref in references] for n in range(1, max_n + 1)]
    max_ref = []
    for counters in ref_counts:
        merged: Counter = Counter()
        for counter in counters:
            merged |= counter      # element-wise max
        max_ref.append(merged)
    return _bleu(hypothesis, max_ref, [len(r) for r in references], max_n, epsilon)


def _bleu(hypothesis: Sequence[str], max_ref: list, ref_lengths: Sequence[int], max_n: int,
          epsilon: float) -> float:
    """BLEU from the per-order maximum reference counts ``max_ref[n-1][ngram]``."""
    c = len(hypothesis)
    if c == 0 or not ref_lengths:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(ngrams(hypothesis, n))
        total = sum(grams.values())
        if total == 0:
            return 0.0
        matched = sum(min(count, max_ref[n - 1].get(g, 0)) for g, count in grams.items())
        precision = matched / total if matched else epsilon / total
        log_precision += math.log(precision) / max_n
    r = min(ref_lengths, key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision)


def self_bleu(texts: Sequence[str], max_n: int = 4, epsilon: float = 0.1) -> float:
    """Mean BLEU of each text against all the others (NaN for fewer than two texts).

    Runs in time linear in the corpus: for every n-gram it keeps the two largest per-text
    counts, so the largest count among the *other* texts is known without rebuilding the
    reference set for each hypothesis.
    """
    tokenized = [words(t) for t in texts]
    if len(tokenized) < 2:
        return math.nan
    counts = [[Counter(ngrams(toks, n)) for n in range(1, max_n + 1)] for toks in tokenized]
    # top[n-1][gram] = ((best count, text index), second best count)
    top: list[dict] = [dict() for _ in range(max_n)]
    for i, per_order in enumerate(counts):
        for order, counter in enumerate(per_order):
            table = top[order]
            for gram, count in counter.items():
                best, second = table.get(gram, ((0, -1), 0))
                if count > best[0]:
                    table[gram] = ((count, i), best[0])
                elif count > second:
                    table[gram] = (best, count)
    lengths = [len(t) for t in tokenized]
    scores = []
    for i, toks in enumerate(tokenized):
        max_ref = []
        for order in range(max_n):
            table = top[order]
            others = {}
            for gram in counts[i][order]:
                (best, owner), second = table[gram]
                others[gram] = second if owner == i else best
            max_ref.append(others)
        scores.append(_bleu(toks, max_ref, lengths[:i] + lengths[i + 1:], max_n, epsilon))
    return sum(scores) / len(scores)
