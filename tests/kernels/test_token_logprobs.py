"""token_logprobs and sequence_logprobs against float64 references, on both backends."""
import math

import pytest
import torch

import fdpipe_kernels as kernels
from fdpipe_kernels import reference
from fdpipe_kernels.token_logprobs import MAX_BLOCK
from kernel_cases import (CUDA, DEVICE, DTYPES, FWD_TOL, GRAD_TOL, assert_close, leaf, peaked_logits,
                          random_targets)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: numpy sees the -inf lanes


def float64_logprobs(x, targets, temperature, ignore_index=-100):
    """Independent oracle: log_softmax in float64, gather, entropy with 0 log 0 = 0."""
    logp_all = torch.log_softmax(x.double() / temperature, dim=-1)
    keep = targets != ignore_index
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(keep, logp, zero), torch.where(keep, entropy, zero)


@pytest.mark.parametrize("vocab", [1, 7, 2053, MAX_BLOCK - 1, MAX_BLOCK + 1])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64(backend, vocab, temperature, dtype):
    n = 6
    x = peaked_logits(n, vocab, seed=vocab, dtype=dtype)
    t = random_targets(n, vocab, seed=vocab)
    t[2] = -100
    if vocab > 1:
        x[4, (t[4] + 1) % vocab] = float("-inf")  # a -inf logit that is not the target
    xs, x64 = leaf(x), leaf(x, torch.float64)
    logp, entropy = kernels.token_logprobs(xs, t, temperature=temperature, with_entropy=True)
    ref_logp, ref_entropy = reference.token_logprobs(x64, t, temperature=temperature, with_entropy=True,
                                                     out_dtype=None)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (n,)
    assert_close(logp, ref_logp, FWD_TOL[dtype], "logp")
    assert_close(entropy, ref_entropy, FWD_TOL[dtype], "entropy")
    oracle_logp, oracle_entropy = float64_logprobs(x, t, temperature)
    assert_close(ref_logp, oracle_logp, (1e-12, 1e-12), "reference logp")
    assert_close(ref_entropy, oracle_entropy, (1e-12, 1e-12), "reference entropy")

    g = torch.Generator().manual_seed(7)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()
    ((ref_logp * g_logp.double()).sum() + (ref_entropy * g_ent.double()).sum()).backward()
    assert xs.grad.dtype == dtype
    assert_close(xs.grad, x64.grad, GRAD_TOL[dtype], "grad")
    assert torch.all(xs.grad[2] == 0)


def test_extreme_logits(backend):
    v = 9
    x = peaked_logits(4, v, seed=3)
    x[0, :] = torch.tensor([1e4, -1e4, 1e4 - 2, 0, 5, -5, 1e4, 3, -1e4])
    x[1, 3] = float("-inf")
    x[2, :] = -1e4
    x[2, 5] = -1e4 + 1
    t = torch.tensor([1, 3, 5, 0], device=DEVICE)
    xs, x64 = leaf(x), leaf(x, torch.float64)
    logp, ent = kernels.token_logprobs(xs, t, with_entropy=True)
    ref_logp, ref_ent = reference.token_logprobs(x64, t, with_entropy=True, out_dtype=None)
    assert logp[1].item() == -math.inf  # target at -inf
    assert torch.isfinite(ent).all()
    fin = torch.isfinite(ref_logp)
    assert_close(logp[fin], ref_logp[fin], (1e-5, 1e-6), "logp")
    assert_close(ent, ref_ent, (1e-5, 1e-6), "entropy")
    (logp[fin].sum() + ent.sum()).backward()
    (ref_logp[fin].sum() + ref_ent.sum()).backward()
    assert torch.isfinite(xs.grad).all()
    assert_close(xs.grad, x64.grad, (1e-5, 1e-5), "grad")


def test_ignored_rows_are_exact_zeros_with_zero_gradient(backend):
    x = peaked_logits(5, 11, seed=5)
    x[1] = float("-inf")  # ignored rows may hold anything, even a row that is not a distribution
    x[3, 2] = float("nan")
    t = torch.tensor([4, -100, 2, -100, 7], device=DEVICE)
    xs = leaf(x)
    logp, ent = kernels.token_logprobs(xs, t, with_entropy=True, temperature=1.3)
    assert torch.equal(logp[[1, 3]], torch.zeros(2, device=DEVICE))
    assert torch.equal(ent[[1, 3]], torch.zeros(2, device=DEVICE))
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(xs.grad[[1, 3]], torch.zeros(2, 11, device=DEVICE))
    assert torch.isfinite(xs.grad).all()

    all_ignored = torch.full((3,), -7, device=DEVICE)
    xs = leaf(x[:3])
    logp, ent = kernels.token_logprobs(xs, all_ignored, ignore_index=-7, with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logp, torch.zeros(3, device=DEVICE)) and torch.equal(ent, torch.zeros(3, device=DEVICE))
    assert torch.equal(xs.grad, torch.zeros_like(xs.grad))


def test_leading_dims_non_contiguous_and_inputs_untouched(backend):
    base = peaked_logits(2 * 3 * 2, 13, seed=11).reshape(2, 6, 13)
    x = base[:, ::2, :]  # [2, 3, 13], row stride 26: not contiguous
    wide = peaked_logits(6, 26, seed=12).reshape(2, 3, 26)[..., ::2]  # column stride 2
    t = random_targets(6, 13, seed=11).reshape(2, 3)
    t[1, 1] = -100
    for logits in (x, wide, x.transpose(0, 1)):
        targets = t if logits.shape[:2] == t.shape else t.T
        xs = leaf(logits)
        xs_before = logits.detach().clone()
        logp = kernels.token_logprobs(xs, targets, temperature=0.9)
        ref = reference.token_logprobs(leaf(logits, torch.float64), targets, temperature=0.9, out_dtype=None)
        assert logp.shape == targets.shape
        assert_close(logp, ref, FWD_TOL[torch.float32])
        grad_out = torch.randn(targets.shape, device=DEVICE)
        logp.backward(grad_out)
        assert torch.equal(xs.detach(), xs_before)
        assert xs.grad.shape == logits.shape


def test_repeated_runs_are_bit_identical(backend):
    x = peaked_logits(4, 300, seed=21)
    t = random_targets(4, 300, seed=21)
    results = []
    for _ in range(2):
        xs = leaf(x)
        logp, ent = kernels.token_logprobs(xs, t, with_entropy=True, temperature=0.8)
        (logp.sum() + 2 * ent.sum()).backward()
        results.append((logp, ent, xs.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_no_entropy_returns_one_tensor(backend):
    x = peaked_logits(3, 5, seed=1)
    out = kernels.token_logprobs(x, random_targets(3, 5, seed=1))
    assert isinstance(out, torch.Tensor) and out.shape == (3,)


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[1, 2] = float("-inf")
    t = torch.tensor([0, 3, -100, 5])
    torch.autograd.gradcheck(
        lambda a: reference.token_logprobs(a, t, temperature=1.3, with_entropy=True, out_dtype=None),
        (x.requires_grad_(),),
    )


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_sequence_logprobs(backend, temperature):
    b, steps, v = 3, 5, 17
    x = peaked_logits(b * steps, v, seed=31).reshape(b, steps, v)
    t = random_targets(b * steps, v, seed=31).reshape(b, steps)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool, device=DEVICE)
    t_with_pad = torch.where(mask, t, torch.full_like(t, 10**6))  # masked-out targets may be anything
    xs, x64 = leaf(x), leaf(x, torch.float64)
    total = kernels.sequence_logprobs(xs, t_with_pad, mask, temperature=temperature)
    per_token = torch.log_softmax(x64 / temperature, -1).gather(-1, t[..., None])[..., 0]
    expected = (per_token * mask).sum(-1)
    assert total.shape == (b,) and total.dtype == torch.float32
    assert total[2].item() == 0.0
    assert_close(total, expected, FWD_TOL[torch.float32])
    total.backward(torch.tensor([1.0, -2.0, 3.0], device=DEVICE))
    (expected * torch.tensor([1.0, -2.0, 3.0], device=DEVICE, dtype=torch.float64)).sum().backward()
    assert_close(xs.grad, x64.grad, GRAD_TOL[torch.float32])
    assert torch.equal(xs.grad[2], torch.zeros(steps, v, device=DEVICE))


def test_shape_and_argument_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="same leading shape"):
        kernels.token_logprobs(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_logprobs(x, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="integer"):
        kernels.token_logprobs(x, torch.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        kernels.sequence_logprobs(x[None], torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))


@(pytest.mark.slow if not CUDA else lambda f: f)  # runs by default on GPU, with -m slow on CPU
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_gpt2_vocabulary(backend, dtype):
    n, v = (64 if CUDA else 4), 50257
    x = peaked_logits(n, v, seed=50257, dtype=dtype)
    t = random_targets(n, v, seed=50257)
    xs, x64 = leaf(x), leaf(x, torch.float64)
    logp, ent = kernels.token_logprobs(xs, t, with_entropy=True)
    ref_logp, ref_ent = reference.token_logprobs(x64, t, with_entropy=True, out_dtype=None)
    assert_close(logp, ref_logp, FWD_TOL[dtype])
    assert_close(ent, ref_ent, (1e-4, 1e-5))
    (logp.sum() + ent.sum()).backward()
    (ref_logp.sum() + ref_ent.sum()).backward()
    assert_close(xs.grad, x64.grad, GRAD_TOL[dtype])
