"""token_divergences against float64 references, on both backends."""
import math

import pytest
import torch

import fdpipe_kernels as kernels
from fdpipe_kernels import reference
from fdpipe_kernels.token_divergences import MAX_BLOCK
from kernel_cases import DEVICE, DTYPES, FWD_TOL, GRAD_TOL, assert_close, leaf, peaked_logits

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
NAMES = ("kl_pi_ref", "kl_ref_pi", "js", "tv")


def naive_float64(x, y, temperature):
    """Textbook formulas on probabilities (inputs without -inf): the oracle of the reference."""
    p = torch.softmax(x.double() / temperature, -1)
    q = torch.softmax(y.double() / temperature, -1)
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    return kl(p, q), kl(q, p), (kl(p, m) + kl(q, m)) / 2, (p - q).abs().sum(-1) / 2


def pair(n, v, seed, dtype=torch.float32):
    x = peaked_logits(n, v, seed=seed, dtype=dtype)
    y = (x.double() + peaked_logits(n, v, seed=seed + 100, dtype=torch.float64, scale=1.5)).to(dtype)
    return x, y


def check_against_reference(x, y, temperature, mask, dtype, fwd_tol=None, grad_tol=None):
    n = x.shape[0]
    xs, x64 = leaf(x), leaf(x, torch.float64)
    got = kernels.token_divergences(xs, y, temperature=temperature, mask=mask)
    want = reference.token_divergences(x64, y.double(), temperature=temperature, mask=mask, out_dtype=None)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32 and a.shape == (n,), name
        assert_close(a, b, fwd_tol or FWD_TOL[dtype], name)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g).to(DEVICE) for _ in NAMES]
    sum((a * gi).sum() for a, gi in zip(got, grads)).backward()
    sum((b * gi.double()).sum() for b, gi in zip(want, grads)).backward()
    assert xs.grad.dtype == dtype
    assert_close(xs.grad, x64.grad, grad_tol or GRAD_TOL[dtype], "grad")
    return got, xs.grad


@pytest.mark.parametrize("vocab", [1, 7, 2053, MAX_BLOCK - 1, MAX_BLOCK + 1])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(backend, vocab, temperature, dtype):
    x, y = pair(5, vocab, seed=vocab, dtype=dtype)
    mask = torch.tensor([True, True, False, True, True], device=DEVICE)
    got, grad = check_against_reference(x, y, temperature, mask, dtype)
    for value in got:
        assert value[2].item() == 0.0
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))


def test_reference_matches_textbook_formulas():
    x, y = pair(4, 30, seed=2, dtype=torch.float64)
    got = reference.token_divergences(x, y, temperature=0.9, out_dtype=None)
    for name, a, b in zip(NAMES, got, naive_float64(x, y, 0.9)):
        assert_close(a, b, (1e-12, 1e-12), name)


def test_known_values(backend):
    x = torch.tensor([[0.0, 0.0], [30.0, -30.0], [1.0, 2.0]], device=DEVICE)
    y = torch.tensor([[0.0, 0.0], [-30.0, 30.0], [1.0, 2.0]], device=DEVICE)
    d = kernels.token_divergences(x, y)
    assert torch.allclose(d.kl_pi_ref[[0, 2]], torch.zeros(2, device=DEVICE), atol=1e-7)
    assert torch.allclose(d.tv, torch.tensor([0.0, 1.0, 0.0], device=DEVICE), atol=1e-6)
    assert abs(d.js[1].item() - math.log(2)) < 1e-6  # disjoint supports: JS = log 2
    assert abs(d.kl_pi_ref[1].item() - 60.0) < 1e-4  # KL ~ the logit gap when supports barely overlap


def test_infinite_logits_and_extremes(backend):
    x, y = pair(4, 9, seed=8)
    x[0, 3] = y[0, 3] = float("-inf")  # shared -inf (a banned token): everything finite
    x[1, :] = torch.tensor([1e4, -1e4, 1e4 - 1, 0, 3, -3, 1e4 - 5, 2, 1])
    y[1, :] = torch.tensor([1e4 - 2, 1e4, -1e4, 0, 3, -3, 1e4 - 5, 2, 1])
    got, grad = check_against_reference(x, y, 1.0, None, torch.float32, fwd_tol=(1e-5, 1e-6), grad_tol=(1e-5, 1e-5))
    assert all(torch.isfinite(v).all() for v in got) and torch.isfinite(grad).all()

    one_sided = x[:1].clone()
    one_sided[0, 5] = float("-inf")  # pi gives 0 where ref does not: KL(ref||pi) is infinite
    d = kernels.token_divergences(one_sided, y[:1])
    assert d.kl_ref_pi.item() == math.inf
    assert math.isfinite(d.kl_pi_ref.item()) and math.isfinite(d.js.item()) and math.isfinite(d.tv.item())


def test_masked_rows_exact_zeros_and_gradient_only_to_logits(backend):
    x, y = pair(4, 12, seed=4)
    x[1] = float("-inf")
    x[3, 0] = float("nan")
    yr = y.clone().requires_grad_()
    xs = leaf(x)
    mask = torch.tensor([True, False, True, False], device=DEVICE)
    d = kernels.token_divergences(xs, yr, mask=mask, temperature=2.0)
    for value in d:
        assert torch.equal(value[[1, 3]], torch.zeros(2, device=DEVICE))
    sum(v.sum() for v in d).backward()
    assert yr.grad is None
    assert torch.equal(xs.grad[[1, 3]], torch.zeros(2, 12, device=DEVICE))
    assert torch.isfinite(xs.grad).all()

    xs = leaf(x[:2])
    d = kernels.token_divergences(xs, y[:2], mask=torch.zeros(2, dtype=torch.bool, device=DEVICE))
    sum(v.sum() for v in d).backward()
    assert all(torch.equal(v, torch.zeros(2, device=DEVICE)) for v in d)
    assert torch.equal(xs.grad, torch.zeros_like(xs.grad))


def test_leading_dims_non_contiguous_untouched_and_repeatable(backend):
    x, y = pair(12, 20, seed=6)
    x3 = x.reshape(2, 6, 20)[:, ::2]  # [2, 3, 20], not contiguous
    y3 = y.reshape(2, 3, 40)[..., ::2]  # column stride 2
    mask = torch.tensor([[True, False, True], [True, True, True]], device=DEVICE)
    before = (x3.clone(), y3.clone())
    runs = []
    for _ in range(2):
        xs = leaf(x3)
        d = kernels.token_divergences(xs, y3, mask=mask, temperature=0.8)
        (d.kl_pi_ref.sum() + d.js.sum() - d.tv.sum()).backward()
        runs.append((*d, xs.grad))
        assert d.js.shape == (2, 3)
    assert torch.equal(x3, before[0]) and torch.equal(y3, before[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = reference.token_divergences(x3.double(), y3.double(), mask=mask, temperature=0.8, out_dtype=None)
    for name, a, b in zip(NAMES, runs[0], want):
        assert_close(a, b, FWD_TOL[torch.float32], name)


def test_reference_gradcheck_float64():
    x, y = pair(4, 6, seed=1, dtype=torch.float64)
    x[0, 2] = y[0, 2] = float("-inf")
    mask = torch.tensor([True, False, True, True])
    torch.autograd.gradcheck(
        lambda a: tuple(reference.token_divergences(a, y, temperature=1.3, mask=mask, out_dtype=None)),
        (x.requires_grad_(),),
    )


def test_argument_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="same shape"):
        kernels.token_divergences(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match="mask"):
        kernels.token_divergences(x, x, mask=torch.ones(3))
