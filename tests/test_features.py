"""Feature values: regexes, word lists, reward thresholds, a Hugging Face classifier and a
user's callable, computed in batches by `FeatureScorer`, with errors naming the config key."""
import numpy as np
import pytest
import torch

import tiny_assets
from fdpipe.common.errors import ConfigError
from fdpipe.common.feature_specs import parse_definitions
from fdpipe.fdpg.features import FeatureScorer
from fdpipe.models.classifier import TextClassifier

TEXTS = ["The film was great", "A movie, fine!", "the plot is dull"]
COMPLETIONS = [" was great", ", fine!", " is dull"]
REWARD = torch.tensor([1.5, 0.2, -1.0], dtype=torch.float64)


def scorer(**definitions):
    return FeatureScorer(parse_definitions(definitions).values())


def test_text_features_read_the_completion_or_the_whole_text():
    phi = scorer(film={"kind": "words", "words": ["film", "movie"]},
                 film_text={"kind": "words", "words": ["film", "movie"], "scope": "text"},
                 bang={"kind": "regex", "pattern": "!$"},
                 upper_the={"kind": "regex", "pattern": "The", "scope": "text"},
                 any_the={"kind": "regex", "pattern": "The", "scope": "text", "ignore_case": True},
                 good={"kind": "reward", "threshold": 0.2},
                 reward={"kind": "reward"}).values(texts=TEXTS, completions=COMPLETIONS, reward=REWARD)
    assert phi.dtype == torch.float64 and phi.shape == (3, 7)
    expected = [[0, 1, 0, 1, 1, 1, 1.5], [0, 1, 1, 0, 0, 1, 0.2], [0, 0, 0, 0, 1, 0, -1.0]]
    torch.testing.assert_close(phi, torch.tensor(expected, dtype=torch.float64))


def test_a_callable_from_the_working_directory_in_batches(tmp_path, monkeypatch):
    (tmp_path / "gdc_user_features.py").write_text(
        "CALLS = []\n"
        "def n_chars(texts):\n    CALLS.append(len(texts))\n    return [float(len(t)) for t in texts]\n"
        "def wrong_shape(texts):\n    return [[1.0, 2.0]] * len(texts)\n"
        "def one_short(texts):\n    return [1.0] * (len(texts) - 1)\n"
        "def not_finite(texts):\n    return [float('nan')] * len(texts)\n")
    monkeypatch.chdir(tmp_path)
    s = scorer(n={"kind": "callable", "function": "gdc_user_features:n_chars", "batch_size": 2},
               long={"kind": "callable", "function": "gdc_user_features:n_chars", "threshold": 15, "scope": "text"})
    phi = s.values(texts=TEXTS, completions=COMPLETIONS, reward=REWARD)
    torch.testing.assert_close(phi[:, 0], torch.tensor([10.0, 7.0, 8.0], dtype=torch.float64))
    torch.testing.assert_close(phi[:, 1], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    import gdc_user_features

    assert gdc_user_features.CALLS == [2, 1, 3]          # batches of at most batch_size texts
    for name, words in (("wrong_shape", "(shape (3,) for 3 texts), got 'shape (3, 2)'"),
                        ("one_short", "(shape (3,) for 3 texts), got 'shape (2,)'"),
                        ("not_finite", "a function returning finite numbers, got 'nan for text 0'")):
        bad = scorer(f={"kind": "callable", "function": f"gdc_user_features:{name}"})
        with pytest.raises(ConfigError) as err:
            bad.values(texts=TEXTS, completions=COMPLETIONS, reward=REWARD)
        assert str(err.value).startswith("config key 'alignment.features.f.function': expected")
        assert words in str(err.value)


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    return tiny_assets.build_tiny_classifier(tmp_path_factory.mktemp("clf") / "clf")


def test_classifier_probability_of_a_label_equals_a_float64_forward(classifier_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    s = scorer(pos={"kind": "classifier", "model": str(classifier_path), "label": "POSITIVE", "batch_size": 2},
               neg={"kind": "classifier", "model": str(classifier_path), "label": 0, "threshold": 0.5})
    phi = s.values(texts=TEXTS, completions=COMPLETIONS, reward=REWARD)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_path).double().eval()
    tok = AutoTokenizer.from_pretrained(classifier_path)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model(**tok(c, return_tensors="pt")).logits[0], -1)
                             for c in COMPLETIONS])
    torch.testing.assert_close(phi[:, 0], probs[:, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phi[:, 1], (probs[:, 0] >= 0.5).double())
    assert len(set(np.round(phi[:, 0].numpy(), 6))) == 3          # a real, text-dependent score


def test_classifier_errors_name_the_key(classifier_path, tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'alignment.features.c.label': expected a label of the "
                                          r"classifier \(NEGATIVE, POSITIVE\), got 'happy'$"):
        scorer(c={"kind": "classifier", "model": str(classifier_path), "label": "happy"})
    with pytest.raises(ConfigError, match=r"^config key 'k': expected a text-classification model folder or cached "
                                          r"Hub name \(OSError"):
        TextClassifier.load(str(tmp_path / "nothing-here"), key="k")
