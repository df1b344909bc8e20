"""linear_token_logprobs: chunked LM head against a dense float64 computation."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fdpipe_kernels as kernels
from kernel_cases import DEVICE, DTYPES, needs_cuda

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def make_inputs(n, h, v, *, seed, dtype=torch.float32, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 3
    bias = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    cast = lambda a: None if a is None else a.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE)


def dense_float64(hidden, weight, bias, targets, temperature, ignore_index=-100):
    """Oracle: the full logits in float64, log_softmax, gather, entropy."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    logp_all = torch.log_softmax(logits / temperature, -1)
    keep = targets != ignore_index
    logp = logp_all.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * keep
    entropy = -(logp_all.exp() * logp_all).sum(-1) * keep
    return logp, entropy


def leaves(*tensors, dtype=None):
    return [None if a is None else a.detach().clone().to(dtype or a.dtype).requires_grad_() for a in tensors]


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64, None])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_dense_float64(backend, chunk_size, with_bias, dtype):
    n, h, v = 10, 8, 37
    hidden, weight, bias, t = make_inputs(n, h, v, seed=chunk_size or 0, dtype=dtype, with_bias=with_bias)
    t[3] = -100
    h1, w1, b1 = leaves(hidden, weight, bias)
    h2, w2, b2 = leaves(hidden, weight, bias, dtype=torch.float64)
    logp, ent = kernels.linear_token_logprobs(h1, w1, t, bias=b1, temperature=1.5, with_entropy=True,
                                              chunk_size=chunk_size)
    ref_logp, ref_ent = dense_float64(h2, w2, b2, t, 1.5)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    fwd_tol = 3e-5 if dtype == torch.float32 else 2e-2  # half inputs: the matmul itself rounds
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=fwd_tol, rtol=fwd_tol)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=fwd_tol, rtol=fwd_tol)
    assert logp[3].item() == 0.0 and ent[3].item() == 0.0
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    ((ref_logp * g1.double()).sum() + (ref_ent * g2.double()).sum()).backward()
    grad_tol = 2e-5 if dtype == torch.float32 else 5e-2
    for got, want, name in ((h1, h2, "hidden"), (w1, w2, "weight"), (b1, b2, "bias")):
        if got is None:
            continue
        assert got.grad.dtype == got.dtype, name
        torch.testing.assert_close(got.grad.double(), want.grad, atol=grad_tol, rtol=grad_tol, msg=name)
    assert torch.equal(h1.grad[3], torch.zeros(h, device=DEVICE, dtype=dtype))


def test_leading_dims_and_only_some_gradients(backend):
    hidden, weight, _, t = make_inputs(6, 5, 11, seed=4, with_bias=False)
    hidden = hidden.reshape(2, 3, 5)
    t = t.reshape(2, 3)
    w = weight.detach().clone().requires_grad_()
    logp = kernels.linear_token_logprobs(hidden, w, t, chunk_size=4)
    assert logp.shape == (2, 3)
    logp.sum().backward()  # hidden needs no gradient: only the weight gets one
    w64 = weight.double().requires_grad_()
    torch.log_softmax(hidden.double() @ w64.T, -1).gather(-1, t[..., None]).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=2e-5, rtol=2e-5)
    assert hidden.grad is None


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes) that a non-mutating aten op produces while active.

    Mutating ops (`copy_`, `addmm_`, ...) return tensors that already exist; they are skipped
    (Triton's interpreter copies whole storages back with `copy_`).
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable:
            for value in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(value, torch.Tensor):
                    self.largest = max(self.largest, value.numel() * value.element_size())
        return out


def test_chunks_never_hold_full_logits(backend):
    n, h, v, chunk = 24, 4, 50, 5
    hidden, weight, bias, t = make_inputs(n, h, v, seed=9)
    h1, w1, b1 = leaves(hidden, weight, bias)
    with LargestAllocation() as probe:
        logp, ent = kernels.linear_token_logprobs(h1, w1, t, bias=b1, with_entropy=True, chunk_size=chunk)
        (logp.sum() + ent.sum()).backward()
    # one float32 chunk of logits [chunk, V] or a weight-sized gradient [V, H] is the largest
    assert probe.largest <= 4 * max(chunk * v, v * h, n * h) < 4 * n * v
    h2, w2, b2 = leaves(hidden, weight, bias)
    full_logp, full_ent = kernels.linear_token_logprobs(h2, w2, t, bias=b2, with_entropy=True, chunk_size=n)
    torch.testing.assert_close(logp, full_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, full_ent, atol=1e-6, rtol=1e-6)


@needs_cuda
def test_cuda_peak_memory_is_one_chunk(backend):
    n, h, v, chunk = 4096, 256, 32000, 256
    hidden, weight, bias, t = make_inputs(n, h, v, seed=2, dtype=torch.bfloat16)
    h1, w1 = leaves(hidden, weight)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    logp = kernels.linear_token_logprobs(h1, w1, t, chunk_size=chunk)
    logp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    full_logits = n * v * hidden.element_size()
    grads_and_outputs = (n * h + v * h) * hidden.element_size() * 2 + n * 64
    assert extra < grads_and_outputs + 4 * chunk * v * 4, (extra, full_logits)
    assert extra < full_logits / 2


def test_argument_errors():
    hidden, weight, _, t = make_inputs(4, 3, 5, seed=0)
    with pytest.raises(ValueError, match="weight"):
        kernels.linear_token_logprobs(hidden, weight.T, t)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_token_logprobs(hidden, weight, t, bias=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size"):
        kernels.linear_token_logprobs(hidden, weight, t, chunk_size=0)


def test_repeatable_and_inputs_untouched(backend):
    hidden, weight, bias, t = make_inputs(7, 6, 19, seed=13)
    before = [a.clone() for a in (hidden, weight, bias)]
    runs = []
    for _ in range(2):
        h1, w1, b1 = leaves(hidden, weight, bias)
        logp, ent = kernels.linear_token_logprobs(h1, w1, t, bias=b1, with_entropy=True, chunk_size=3,
                                                  temperature=0.9)
        (logp.sum() - ent.sum()).backward()
        runs.append((logp, ent, h1.grad, w1.grad, b1.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(before, (hidden, weight, bias)))


def test_unused_entropy_output_leaves_the_logprob_gradient_alone():
    """The entropy output asked for but not used (detached) is not differentiated: the gradient of
    the log-probabilities alone is the one without entropy, in float64."""
    from fdpipe_kernels import reference

    hidden, weight, bias, targets = make_inputs(7, 8, 50, seed=3, dtype=torch.float64)
    grads = []
    for with_entropy in (True, False):
        h = hidden.detach().clone().requires_grad_(True)
        out = reference.linear_token_logprobs(h, weight, targets, bias=bias, with_entropy=with_entropy,
                                              chunk_size=3, out_dtype=None)
        logp = out[0] if with_entropy else out
        (logp * torch.arange(7, dtype=torch.float64)).sum().backward()
        grads.append(h.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-14, rtol=0)
