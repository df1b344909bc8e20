"""Backend selection: auto / triton / torch, the environment variable and the error messages."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fdpipe_kernels as kernels
from fdpipe_kernels import backend
from kernel_cases import CUDA, TRITON_RUNS

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: numpy sees the -inf lanes


def autograd_nodes(tensor):
    """Names of every autograd node behind `tensor`."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def run_python(code, **env):
    """Run `code` in a fresh interpreter (import-time behaviour), returning the completed process.

    The interpreter finds `fdpipe_kernels` as this one does (installed, or through the
    PYTHONPATH that kernels/gpu_check.sh sets up), so the environment is passed on unchanged.
    """
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                           cwd=ROOT, timeout=120)


def test_set_backend_validates_and_returns_previous():
    previous = kernels.set_backend("torch")
    try:
        assert kernels.get_backend() == "torch"
        assert kernels.set_backend("AUTO") == "torch"
        with pytest.raises(kernels.BackendError, match="expected one of auto, triton, torch, got 'cuda'"):
            kernels.set_backend("cuda")
        assert kernels.get_backend() == "auto"
    finally:
        kernels.set_backend(previous)


def test_auto_uses_reference_on_cpu_and_triton_when_forced():
    x = torch.randn(3, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    previous = kernels.set_backend("auto")
    try:
        names = autograd_nodes(kernels.token_logprobs(x, t))
        assert ("TokenLogprobsFunctionBackward" in names) == CUDA
        if TRITON_RUNS:
            kernels.set_backend("triton")
            assert "TokenLogprobsFunctionBackward" in autograd_nodes(kernels.token_logprobs(x, t))
            assert "LinearTokenLogprobsFunctionBackward" in autograd_nodes(
                kernels.linear_token_logprobs(x, torch.randn(4, 5), torch.tensor([0, 1, 3])))
            assert "TokenDivergencesFunctionBackward" in autograd_nodes(kernels.token_divergences(x, x.detach()).js)
        kernels.set_backend("torch")
        assert "TokenLogprobsFunctionBackward" not in autograd_nodes(kernels.token_logprobs(x, t))
    finally:
        kernels.set_backend(previous)


@pytest.mark.skipif(not backend.HAS_TRITON, reason="needs triton installed")
def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    proc = run_python(
        "import torch, fdpipe_kernels as kernels\n"
        "try:\n"
        "    kernels.token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))\n"
        "except kernels.BackendError as e:\n"
        "    print('ERR', e)\n",
        TRITON_INTERPRET="0", FDPIPE_KERNEL_BACKEND="triton", CUDA_VISIBLE_DEVICES="",
    )
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert message.startswith("ERR kernel backend 'triton' needs CUDA tensors (got cpu)")
    assert "TRITON_INTERPRET=1" in message and "\n" not in message


def test_environment_variable_sets_and_validates_backend():
    proc = run_python("import fdpipe_kernels as kernels; print(kernels.get_backend())", FDPIPE_KERNEL_BACKEND="torch")
    assert proc.returncode == 0 and proc.stdout.strip() == "torch", proc.stderr
    proc = run_python("import fdpipe_kernels", FDPIPE_KERNEL_BACKEND="fast")
    assert proc.returncode != 0
    assert "FDPIPE_KERNEL_BACKEND: expected one of auto, triton, torch, got 'fast'" in proc.stderr


def test_works_without_triton():
    proc = run_python(
        "import sys; sys.modules['triton'] = None  # makes `import triton` fail\n"
        "import torch, fdpipe_kernels as kernels\n"
        "from fdpipe_kernels import backend\n"
        "x = torch.randn(4, 6, requires_grad=True); t = torch.tensor([0, 1, -100, 5])\n"
        "lp, ent = kernels.token_logprobs(x, t, with_entropy=True)\n"
        "d = kernels.token_divergences(x, torch.randn(4, 6))\n"
        "h = kernels.linear_token_logprobs(torch.randn(4, 3), torch.randn(6, 3), t, chunk_size=2)\n"
        "(lp.sum() + ent.sum() + d.js.sum()).backward()\n"
        "print(backend.HAS_TRITON, lp.dtype, x.grad.shape)\n"
        "kernels.set_backend('triton')\n"
        "try:\n"
        "    kernels.token_logprobs(x, t)\n"
        "except kernels.BackendError as e:\n"
        "    print('ERR', e)\n",
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert first == "False torch.float32 torch.Size([4, 6])"
    assert second.startswith("ERR kernel backend 'triton' requested but triton is not importable")


def test_autograd_functions_follow_one_naming_rule():
    """Every autograd Function of the package is named `<Op>Function` (its graph node `<Op>FunctionBackward`)."""
    import importlib
    import inspect

    found = []
    for name in ("token_logprobs", "linear_token_logprobs", "token_divergences", "reference"):
        module = importlib.import_module(f"fdpipe_kernels.{name}")
        found += [cls.__name__ for _, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, torch.autograd.Function) and cls.__module__ == module.__name__]
    assert sorted(found) == ["LinearTokenLogprobsFunction", "ReferenceLinearTokenLogprobsFunction",
                             "TokenDivergencesFunction", "TokenLogprobsFunction"]
