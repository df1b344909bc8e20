"""The kernels package's import name, `fdpipe_kernels`, is this project's alone.

The folder is `kernels/`, but the name `kernels` belongs to another PyPI distribution
(Hugging Face's hub kernels, which transformers' hub-kernel integration imports), so the folder
installs as `fdpipe_kernels`. The first tests need nothing extra installed; the side-by-side
test runs when that distribution is installed and is required under CI (`.ci/run` installs it).
"""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fdpipe_kernels

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
HUB_KERNELS_VERSION = "0.17.2"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_import_names_are_owned_by_this_distribution_only():
    owners = importlib.metadata.packages_distributions()
    assert owners.get("fdpipe_kernels") == ["fdpipe"]
    assert owners.get("fdpipe") == ["fdpipe"]
    assert "fdpipe" not in owners.get("kernels", [])


def test_fdpipe_kernels_is_this_repositorys_kernels_folder():
    assert Path(fdpipe_kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(fdpipe_kernels.token_logprobs) and callable(fdpipe_kernels.token_divergences)


SIDE_BY_SIDE = textwrap.dedent("""
    import sys, sysconfig
    from pathlib import Path

    import fdpipe_kernels
    import kernels
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo_kernels, hub_kernels = Path(fdpipe_kernels.__file__).resolve(), Path(kernels.__file__).resolve()
    assert repo_kernels != hub_kernels, (repo_kernels, hub_kernels)
    assert repo_kernels.parent == Path(sys.argv[1]).resolve() / "kernels", repo_kernels
    site_dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    assert any(hub_kernels.is_relative_to(d) for d in site_dirs), (hub_kernels, site_dirs)
    assert callable(kernels.get_kernel)

    model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
    ids = tokenizer(["The movie is wonderful."], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    logp = fdpipe_kernels.token_logprobs(logits, ids[:, 1:])
    expected = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)
    assert sys.modules.get("kernels") is kernels
    print("ok", hub_kernels)
""")


@pytest.mark.skipif(not _installed("kernels") and not IN_CI,
                    reason=f"Hugging Face's `kernels` distribution is not installed (CI installs "
                           f"kernels=={HUB_KERNELS_VERSION}; outside CI this test is optional)")
def test_side_by_side_with_hub_kernels(tmp_path):
    """With `kernels` installed, both packages import as themselves and a tiny model still loads.

    Run from a temporary directory: from the repository root, the `kernels/` folder itself
    would shadow the installed `kernels` package.
    """
    assert _installed("kernels"), (
        f"CI is set but the `kernels` distribution is missing: install kernels=={HUB_KERNELS_VERSION} "
        "(see .ci/run)")
    import tiny_assets

    model_dir = tiny_assets.build_tiny_lm(tmp_path / "tiny_lm")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE, str(ROOT), str(model_dir)], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok ")
