"""Gold reward: VADER compound scores."""
import numpy as np
import pytest

from fdpipe.models.gold import gold_reward


def test_known_values_and_dtype():
    scores = gold_reward(["This movie is wonderful and moving.", "A dull, boring, terrible film.", ""])
    assert scores.dtype == np.float64 and scores.shape == (3,)
    # VADER 3.3.2 compound scores of these sentences
    np.testing.assert_allclose(scores, [0.5719, -0.7964, 0.0], atol=1e-12)


def test_sign_follows_sentiment():
    pos = gold_reward(["I loved it, a brilliant and beautiful film!", "Great acting, superb story."])
    neg = gold_reward(["I hated it, an awful and ugly mess.", "Horrible acting, a painful story."])
    assert (pos > 0.5).all() and (neg < -0.5).all()


def test_empty_list_and_bad_input():
    assert gold_reward([]).shape == (0,)
    with pytest.raises(TypeError, match="single string"):
        gold_reward("a sentence")
    with pytest.raises(TypeError, match="strings"):
        gold_reward(["ok", 3])
