"""Config validation: defaults are filled in, and a bad value names its key in one line."""
import subprocess
import sys
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
    runs = cfg["alignment"]["runs"]
    assert set(runs) == {"rkl", "fkl", "js", "gdc_pointwise", "gdc_moments"}   # at most five align runs
    assert {runs[r]["target"]["kind"] for r in ("gdc_pointwise", "gdc_moments")} == {"pointwise", "distributional"}
    assert all(len(runs[r]["target"]["features"]) >= 2 for r in ("gdc_pointwise", "gdc_moments"))


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
    (lambda c: c["alignment"]["runs"]["fkl"].update(target={"kind": "rlhf", "beta": 0}),
     "config key 'alignment.runs.fkl.target.beta': expected a value > 0, got 0"),
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


def _dry_run(tmp_path, user_config: str):
    """`snakemake -n --configfile my.yaml` in an empty folder: the DAG a user's config builds."""
    (tmp_path / "my.yaml").write_text(user_config)
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "-s", str(REPO / "Snakefile"),
                           "-d", str(tmp_path), "--configfile", str(tmp_path / "my.yaml")],
                          capture_output=True, text=True, timeout=120)


def test_a_users_config_selects_exactly_its_runs(tmp_path):
    out = _dry_run(tmp_path, "alignment:\n  runs:\n    mine: {divergence: chi2}\n  select: [mine, js]\n")
    assert out.returncode == 0, out.stderr
    jobs = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert jobs["align"] == 2 and jobs["evaluate"] == 3      # mine and js (not rkl, fkl, tv) + sft


@pytest.mark.parametrize("user_config, message", [
    ("alignment:\n  select: [rkl, typo]\n", "config key 'alignment.select': expected names of alignment.runs entries"),
    ("sft:\n  lr: -1\n", "config key 'sft.lr': expected a value > 0, got -1"),
])
def test_a_bad_config_stops_the_workflow_with_one_line(tmp_path, user_config, message):
    out = _dry_run(tmp_path, user_config)
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("Using workflow specific")]
    assert len(lines) == 1, out.stderr                        # no traceback after it
    assert message in lines[0]
    where = lines[0][lines[0].rindex("(config from "):]
    assert str(REPO / "config" / "config.yaml") in where and str(tmp_path / "my.yaml") in where
