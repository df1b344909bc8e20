"""The gold reward: VADER's compound sentiment score of a text.

Alignment never trains on it; it is what evaluation compares the proxy reward model
against, so that over-optimization of the proxy shows up as a gap between the two.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_ANALYZER = None


def _analyzer():
    """The one SentimentIntensityAnalyzer of this process (its lexicon is read once)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def gold_reward(texts: Iterable[str]) -> np.ndarray:
    """VADER compound score of each text, in [-1, 1], as a float64 array of len(texts).

    An empty text scores 0. A single string is rejected rather than scored per character.
    """
    if isinstance(texts, str):
        raise TypeError("gold_reward expects a list of texts, got a single string")
    analyzer = _analyzer()
    scores = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"gold_reward expects strings, got {type(text).__name__}")
        scores.append(analyzer.polarity_scores(text)["compound"])
    return np.asarray(scores, dtype=np.float64)
