"""Features in the config: definitions, their uses in targets, and the one-line errors that
stop a bad spec before any job runs (through `validate_config`, as the workflow calls it)."""
import copy
from pathlib import Path

import pytest
import yaml

from fdpipe.common.config import merged_run_config, validate_config
from fdpipe.common.errors import ConfigError
from fdpipe.common.feature_specs import FeatureSpec, check_features, parse_definitions, parse_uses
from fdpipe.common.imports import load_callable

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

FEATURES = {
    "film": {"kind": "words", "words": ["film", "movie"]},
    "exclaim": {"kind": "regex", "pattern": "!$", "scope": "text"},
    "good": {"kind": "reward", "threshold": 0.5},
    "reward": {"kind": "reward"},
}


def config(**target):
    return {"alignment": {"features": copy.deepcopy(FEATURES),
                          "defaults": {"target": {"kind": "rlhf", "beta": 0.1}},
                          "runs": {"gdc": {"divergence": "fkl", "target": target}}}}


def test_definitions_parse_with_their_kind_defaults():
    specs = parse_definitions(FEATURES)
    assert specs["film"].binary and specs["film"].ignore_case and specs["film"].scope == "completion"
    assert specs["exclaim"].binary and not specs["exclaim"].ignore_case and specs["exclaim"].scope == "text"
    assert specs["good"].binary and not specs["reward"].binary
    assert specs["film"].regex().search("A FILM about it") and not specs["film"].regex().search("filmic")
    assert specs["film"].definition() == {"kind": "words", "words": ["film", "movie"], "ignore_case": True,
                                          "scope": "completion"}


def test_uses_by_target_kind():
    specs = parse_definitions(FEATURES)
    uses = parse_uses("pointwise", {"film": {"epsilon": 0.0}, "good": None}, specs, "run.target",
                      default_epsilon=0.01)
    assert [(u.name, u.epsilon, u.moment) for u in uses] == [("film", 0.0, None), ("good", 0.01, None)]
    assert uses[0].key == "run.target.features.film"
    mixed = parse_uses("distributional", {"film": {"moment": 0.4}, "reward": {"moment": -0.2},
                                          "good": {"epsilon": 0.1}}, specs, "t")
    assert [u.is_condition for u in mixed] == [False, False, True]
    assert parse_uses("rlhf", {"exclaim": {}}, specs, "t")[0].epsilon == 1e-3


def test_merged_run_config_brings_the_definitions_of_used_features_only():
    cfg = config(kind="pointwise", features={"film": {"epsilon": 0.01}})["alignment"]
    merged = merged_run_config(cfg, "gdc")
    assert merged["features"] == {"film": FEATURES["film"]}
    plain = {**cfg, "runs": {"rkl": {"divergence": "rkl"}}}
    assert "features" not in merged_run_config(plain, "rkl")


def test_a_valid_config_passes_and_the_default_config_checks():
    validate_config(config(kind="distributional", features={"film": {"moment": 0.5}, "reward": {"moment": 0.2}}),
                    SCHEMA)
    default = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), SCHEMA)
    assert set(default["alignment"]["features"]) == {"positive", "film"}
    check_features(default["alignment"])


BAD = [
    # (edit of the config, the key named, words of the message)
    (lambda c: c["alignment"]["features"]["film"].update(kind="sentiment"),
     "alignment.features.film.kind", "one of ['reward', 'regex'"),
    (lambda c: c["alignment"]["features"]["exclaim"].update(pattern="(unclosed"),
     "alignment.features.exclaim.pattern", "a valid regular expression (missing ), unterminated subpattern"),
    (lambda c: c["alignment"]["features"].update(mine={"kind": "callable", "function": "no_such_module_x:f"}),
     "alignment.features.mine.function", "No module named 'no_such_module_x'"),
    (lambda c: c["alignment"]["features"].update(mine={"kind": "callable", "function": "fdpipe.models.gold:nope"}),
     "alignment.features.mine.function", "a function of module 'fdpipe.models.gold' (it has no 'nope')"),
    (lambda c: c["alignment"]["features"].update(mine={"kind": "callable", "function": "just_a_name"}),
     "alignment.features.mine.function", "a string matching"),
    (lambda c: c["alignment"]["features"].update(clf={"kind": "classifier", "model": "./missing/clf", "label": 1}),
     "alignment.features.clf.model", "a text-classification model folder (it does not exist"),
    (lambda c: c["alignment"]["features"].update(clf={"kind": "classifier", "model": "x/y"}),
     "alignment.features.clf.label", "a label name of the classifier"),
    (lambda c: c["alignment"]["features"]["film"].update(pattern="x"),
     "alignment.features.film.pattern", "one of the keys of a words feature (ignore_case, scope, words)"),
    (lambda c: c["alignment"]["runs"]["gdc"]["target"]["features"].update(film={"moment": 1.0}),
     "alignment.runs.gdc.target.features.film.moment", "a fraction strictly between 0 and 1 (film is binary)"),
    (lambda c: c["alignment"]["runs"]["gdc"]["target"]["features"].update(typo={"moment": 0.5}),
     "alignment.runs.gdc.target.features.typo", "the name of an entry of alignment.features"),
    (lambda c: c["alignment"]["runs"]["gdc"]["target"]["features"].update(good={"moment": 0.5, "epsilon": 0.1}),
     "alignment.runs.gdc.target.features.good", "either a moment"),
    (lambda c: c["alignment"]["runs"]["gdc"]["target"].update(kind="pointwise"),
     "alignment.runs.gdc.target.features.film.moment", "no moment in a pointwise target"),
    (lambda c: c["alignment"]["runs"]["gdc"]["target"].update(features={"reward": {"epsilon": 0.1}}),
     "alignment.runs.gdc.target.features.reward", "a binary feature for a pointwise condition"),
    (lambda c: c["alignment"]["runs"]["gdc"]["target"].update(features={"good": {"epsilon": 0.1}}),
     "alignment.runs.gdc.target.features", "at least one feature with a moment"),
]


@pytest.mark.parametrize("edit, key, words", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_a_bad_feature_spec_stops_with_one_line_naming_the_key(edit, key, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(kind="distributional", features={"film": {"moment": 0.5}})
    validate_config(copy.deepcopy(cfg), SCHEMA)          # the unedited config is fine
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA)
    message = str(err.value)
    assert message.startswith(f"config key '{key}': expected"), message
    assert words in message and "\n" not in message


def test_callables_import_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_gdc_features.py").write_text("def n_words(texts):\n    return [len(t.split()) for t in texts]\n")
    (tmp_path / "broken_gdc_features.py").write_text("import no_such_dependency_x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert load_callable("my_gdc_features:n_words", "k")(["a b", "c"]) == [2, 1]
    with pytest.raises(ConfigError, match=r"'k': expected a module importable .*No module named "
                                          r"'no_such_dependency_x'"):
        load_callable("broken_gdc_features:f", "k")
    FeatureSpec.from_config("n", {"kind": "callable", "function": "my_gdc_features:n_words"}).check_available()
