"""Test-wide setup.

Triton kernels run on the CPU only through its interpreter, which must be chosen before
`triton` is first imported; setting it here makes every test see the same mode.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

# Tests use tiny tensors: one thread avoids oversubscribing small CPUs.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The whole tiny DAG, run once for every test that reads its outputs."""
    from tiny_dag import prepare, snakemake

    work = prepare(tmp_path_factory.mktemp("dag"))
    snakemake(work, "--cores", "2")
    return work
