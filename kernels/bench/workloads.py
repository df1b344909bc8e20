"""One benchmark case's inputs, the implementations compared on it, and the work it must do
(minimum bytes moved, matmul FLOPs) from which bandwidth and TFLOP/s are derived."""
from __future__ import annotations

import logging
import math

import torch

import fdpipe_kernels as kernels

from .settings import BenchSettings

log = logging.getLogger("fdpipe.bench")


# ---------------------------------------------------------------------------------------
# Inputs


def peaked_logits(n, v, dtype, device, gen):
    """Language-model-like logits: Gaussian floor (sd 2) plus one peak of +10 per row."""
    x = torch.randn(n, v, device=device, dtype=torch.float32, generator=gen).mul_(2.0)
    peaks = torch.randint(0, v, (n,), device=device, generator=gen)
    x[torch.arange(n, device=device), peaks] += 10.0
    return x.to(dtype), peaks


def make_inputs(op, n, v, h, dtype, device, seed):
    """Tensors for one case; the first one is the input that receives gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if op == "linear_token_logprobs":
        hidden = torch.randn(n, h, device=device, dtype=dtype, generator=gen)
        weight = (torch.randn(v, h, device=device, dtype=torch.float32, generator=gen) * (4.0 / h**0.5)).to(dtype)
        targets = torch.randint(0, v, (n,), device=device, generator=gen)
        return {"hidden": hidden, "weight": weight, "targets": targets}
    logits, peaks = peaked_logits(n, v, dtype, device, gen)
    if op == "token_divergences":
        ref = (logits.float() + torch.randn(n, v, device=device, generator=gen)).to(dtype)
        return {"logits": logits, "ref_logits": ref}
    sampled = torch.randint(0, v, (n,), device=device, generator=gen)
    targets = torch.where(torch.rand(n, device=device, generator=gen) < 0.8, peaks, sampled)
    return {"logits": logits, "targets": targets}


def grad_key(op) -> str:
    """The input that receives gradients in the timed modes."""
    return "hidden" if op == "linear_token_logprobs" else "logits"


# ---------------------------------------------------------------------------------------
# Implementations: each takes the inputs dict and returns a tensor or a tuple of tensors.


def eager_token_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def eager_token_divergences(logits, ref_logits):
    lp = torch.log_softmax(logits.float(), dim=-1)
    lq = torch.log_softmax(ref_logits.float(), dim=-1)
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp, lq) - math.log(2.0)
    return ((p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1),
            0.5 * ((p * (lp - lm)).sum(-1) + (q * (lq - lm)).sum(-1)), 0.5 * (p - q).abs().sum(-1))


def eager_linear_token_logprobs(hidden, weight, targets):
    return eager_token_logprobs(hidden @ weight.T, targets)


def implementations(settings: BenchSettings, cuda: bool) -> dict:
    """{op: {impl: fn(inputs)}}; baselines that cannot run here are left out (and logged)."""
    impls = {
        "token_logprobs": {
            "fdpipe": lambda d: kernels.token_logprobs(d["logits"], d["targets"]),
            "eager": lambda d: eager_token_logprobs(d["logits"], d["targets"]),
        },
        "token_divergences": {
            "fdpipe": lambda d: tuple(kernels.token_divergences(d["logits"], d["ref_logits"])),
            "eager": lambda d: eager_token_divergences(d["logits"], d["ref_logits"]),
        },
        "linear_token_logprobs": {
            "fdpipe": lambda d: kernels.linear_token_logprobs(d["hidden"], d["weight"], d["targets"]),
            "eager": lambda d: eager_linear_token_logprobs(d["hidden"], d["weight"], d["targets"]),
        },
    }
    if "compile" in settings.baselines and cuda and settings.compile_shape:
        compiled_lp = torch.compile(eager_token_logprobs, dynamic=False)
        compiled_div = torch.compile(eager_token_divergences, dynamic=False)
        impls["token_logprobs"]["compile"] = lambda d: compiled_lp(d["logits"], d["targets"])
        impls["token_divergences"]["compile"] = lambda d: compiled_div(d["logits"], d["ref_logits"])
    elif "compile" in settings.baselines:
        log.info("baseline compile skipped: needs CUDA and a compile_shape")
    if "liger" in settings.baselines:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss, LigerJSD
        except ImportError as exc:
            log.info("baseline liger skipped: %s", exc)
        else:
            if not cuda:
                log.info("baseline liger skipped: needs CUDA")
            else:
                ce = LigerCrossEntropyLoss(reduction="none")
                flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
                jsd = LigerJSD(beta=0.5)
                # Liger's cross entropy writes the gradient into its input, so it runs last.
                impls["token_logprobs"]["liger"] = lambda d: -ce(d["logits"], d["targets"])
                impls["linear_token_logprobs"]["liger"] = lambda d: -flce(d["weight"], d["hidden"], d["targets"])
                impls["token_divergences"]["liger"] = lambda d: jsd(
                    torch.log_softmax(d["logits"].float(), -1), torch.log_softmax(d["ref_logits"].float(), -1))
    return impls


# ---------------------------------------------------------------------------------------
# Work models


def min_bytes(op, mode, n, v, h, itemsize):
    """Bytes the op must move at least: logits read once per pass it needs, gradient written once."""
    if op == "linear_token_logprobs":
        return float("nan")  # compute-bound: reported as TFLOP/s instead
    reads = 2 if op == "token_divergences" else 1  # logits (and ref_logits)
    per = {"forward": reads, "no_grad": reads, "backward": reads + 1, "forward_backward": 2 * reads + 1}[mode]
    return per * n * v * itemsize


def useful_flops(op, mode, n, v, h):
    """Matmul FLOPs of the LM head (forward 2NVH, backward 4NVH); NaN for the other ops."""
    if op != "linear_token_logprobs":
        return float("nan")
    return {"forward": 2, "no_grad": 2, "backward": 4, "forward_backward": 6}[mode] * n * v * h
