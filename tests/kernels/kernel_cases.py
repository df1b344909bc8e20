"""Shared inputs, parametrizations and comparisons for the kernel tests.

Every op is compared with the float64 torch reference (`out_dtype=None` keeps float64).
Triton runs on CUDA, or on CPU tensors through `TRITON_INTERPRET=1` (set in tests/conftest.py),
so shapes stay tiny.
"""
import pytest
import torch

from fdpipe_kernels import backend as kernel_backend

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = kernel_backend.HAS_TRITON and (CUDA or kernel_backend.INTERPRETED)

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton",
                 marks=pytest.mark.skipif(not TRITON_RUNS, reason="triton needs CUDA or TRITON_INTERPRET=1")),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16", marks=needs_cuda),
    pytest.param(torch.float16, id="fp16", marks=needs_cuda),
]

# Absolute / relative tolerances against float64. Forward values are computed in float32
# whatever the input dtype; gradients are stored in the input dtype.
FWD_TOL = {torch.float32: (3e-5, 1e-5), torch.bfloat16: (1e-4, 1e-4), torch.float16: (1e-4, 1e-4)}
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def peaked_logits(n, v, *, seed, dtype=torch.float32, scale=4.0, device=DEVICE):
    """Logits shaped like a language model's: a few large values on a noisy floor."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    x += torch.where(torch.rand(n, v, generator=g) < 0.01, 8.0, 0.0)
    return x.to(dtype).to(device)


def random_targets(n, v, *, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, v, (n,), generator=g).to(device)


def leaf(x, dtype=None):
    """A fresh leaf copy (optionally cast) that requires grad."""
    return x.detach().clone().to(dtype or x.dtype).requires_grad_(True)


def assert_close(actual, expected, tol, msg=""):
    atol, rtol = tol
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}" if msg else m)
