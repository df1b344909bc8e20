"""Config validation: defaults are filled in, and a bad value names its key in one line."""
from pathlib import Path

import pytest
import yaml

from fdpipe.common.config import merged_run_config, run_names, validate_config
from fdpipe.common.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults():
    cfg = validate_config(default_config(), SCHEMA)
    assert cfg["alignment"]["defaults"]["checkpoint_every"] >= 1
    assert set(cfg["alignment"]["runs"]) == {"rkl", "fkl", "js", "tv"}


def test_empty_config_gets_every_default():
    cfg = validate_config({}, SCHEMA)
    assert cfg["seed"] == 0 and cfg["data"]["source"] == "embedded"
    assert cfg["alignment"]["runs"]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["alignment"]["runs"]["rkl"].update(lr=-1),
     "config key 'alignment.runs.rkl.lr': expected a value > 0, got -1"),
    (lambda c: c["alignment"]["runs"]["js"].update(divergence="kl"),
     "config key 'alignment.runs.js.divergence': expected one of"),
    (lambda c: c["data"].update(val_fraction="a"),
     "config key 'data.val_fraction': expected a value of type number, got 'a'"),
    (lambda c: c.update(bogus=1), "config key 'bogus': expected one of the known keys"),
    (lambda c: c["alignment"]["runs"]["tv"].update(target={"kind": "rlhf", "beta": 0}),
     "config key 'alignment.runs.tv.target.beta': expected a value > 0, got 0"),
])
def test_bad_values_name_the_key(edit, message):
    cfg = default_config()
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_run_config_merges_defaults_and_nested_target():
    alignment = {"defaults": {"lr": 1e-5, "steps": 3, "target": {"kind": "rlhf", "beta": 0.1}},
                 "runs": {"a": {"lr": 2e-5, "target": {"beta": 0.5}}, "b": {}}}
    assert merged_run_config(alignment, "a") == {"lr": 2e-5, "steps": 3, "target": {"kind": "rlhf", "beta": 0.5}}
    assert merged_run_config(alignment, "b")["target"] == {"kind": "rlhf", "beta": 0.1}
    assert alignment["defaults"]["target"]["beta"] == 0.1      # the defaults are not modified
    with pytest.raises(ConfigError, match="alignment.runs"):
        merged_run_config(alignment, "missing")


def test_select_states_exactly_which_runs_exist():
    alignment = {"runs": {"rkl": {}, "js": {}, "mine": {"divergence": "tv"}}}
    assert run_names(alignment) == ["rkl", "js", "mine"]
    assert run_names({**alignment, "select": ["mine"]}) == ["mine"]
    assert run_names({**alignment, "select": None}) == ["rkl", "js", "mine"]
    with pytest.raises(ConfigError, match=r"'alignment.select': expected names of alignment.runs entries .*got 'typo'"):
        run_names({**alignment, "select": ["mine", "typo"]})
    with pytest.raises(ConfigError, match="'alignment.select': expected a non-empty list"):
        run_names({**alignment, "select": []})
    with pytest.raises(ConfigError, match="'alignment.select': expected each run named once"):
        run_names({**alignment, "select": ["js", "js"]})
