"""Fixtures for the kernel tests: which backend runs, on which device."""
import pytest

import fdpipe_kernels as kernels
from kernel_cases import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force one backend for the test, restoring the previous choice afterwards."""
    previous = kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(previous)
