"""distinct-n and self-BLEU on cases worked out by hand."""
import math
import random

import pytest

from fdpipe.common.text_metrics import distinct_n, ngrams, self_bleu, sentence_bleu, words


def test_words_split_punctuation_and_lowercase():
    assert words("Great, FUN film!") == ["great", ",", "fun", "film", "!"]


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []


def test_distinct_n_hand_case():
    texts = ["a a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)     # {a, b, c} of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)     # aa, ab, ab, bc
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert math.isnan(distinct_n(["a b"], 3))
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_sentence_bleu_identical_is_one():
    hyp = words("the movie is great fun")
    assert sentence_bleu(hyp, [hyp]) == pytest.approx(1.0)


def test_sentence_bleu_hand_case_with_smoothing():
    hyp = words("the cat sat on the mat")
    ref = words("the cat is on the mat")
    # precisions 5/6, 3/5, 1/4 and no 4-gram match -> 0.1/3; equal lengths -> no brevity penalty
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert sentence_bleu(hyp, [ref]) == pytest.approx(expected, rel=1e-12)


def test_sentence_bleu_brevity_penalty_and_clipping():
    # hypothesis "the the" against "the cat sat": unigram clipped to 1/2, bigram 0.1/1
    hyp, ref = ["the", "the"], ["the", "cat", "sat"]
    expected = math.exp(1 - 3 / 2) * (0.5 * 0.1) ** 0.5
    assert sentence_bleu(hyp, [ref], max_n=2) == pytest.approx(expected, rel=1e-12)
    # closest reference length wins (2 is closer to 2 than 5)
    assert sentence_bleu(hyp, [ref, ["the", "the"]], max_n=2) == pytest.approx(1.0)
    assert sentence_bleu(["a"], [["a", "b"]], max_n=2) == 0.0   # no bigram in the hypothesis


def test_self_bleu_hand_case():
    texts = ["a b c d", "a b c d", "e f g h"]
    unrelated = (0.1 / 4 * 0.1 / 3 * 0.1 / 2 * 0.1 / 1) ** 0.25
    assert self_bleu(texts) == pytest.approx((1 + 1 + unrelated) / 3, rel=1e-12)
    assert math.isnan(self_bleu(["only one"]))


def test_self_bleu_matches_brute_force():
    rng = random.Random(0)
    vocab = "a b c d e f".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))) for _ in range(25)]
    toks = [words(t) for t in texts]
    brute = sum(sentence_bleu(toks[i], toks[:i] + toks[i + 1:]) for i in range(len(toks))) / len(toks)
    assert self_bleu(texts) == pytest.approx(brute, rel=1e-12)
    assert self_bleu(texts, max_n=2) != pytest.approx(brute)
