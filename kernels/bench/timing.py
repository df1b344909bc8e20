"""Timing: a clock (CUDA events or perf_counter), one timed call per mode, the median over
repeats with peak extra memory, and the device's copy bandwidth."""
from __future__ import annotations

import statistics
import time

import torch


class Clock:
    """CUDA events on GPU, perf_counter on CPU; `elapsed()` returns seconds per interval."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append([event, None])
        else:
            self.marks.append([time.perf_counter(), None])

    def stop(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[-1][1] = event
        else:
            self.marks[-1][1] = time.perf_counter()

    def elapsed(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in self.marks]
        return [b - a for a, b in self.marks]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _one_call(fn, inputs, grad_key, mode, clock):
    """One call of `fn` in `mode`, timed by `clock` (the backward mode times only the backward)."""
    if mode == "no_grad":
        with torch.no_grad():
            clock.start()
            fn(inputs)
            clock.stop()
        return
    leaf = inputs[grad_key].detach().requires_grad_(True)
    args = {**inputs, grad_key: leaf}
    if mode == "backward":
        outs = [o for o in _as_tuple(fn(args)) if o.requires_grad]
        grads = [torch.ones_like(o) for o in outs]
        clock.start()
        torch.autograd.backward(outs, grads)
        clock.stop()
        return
    clock.start()
    outs = fn(args)
    if mode == "forward_backward":
        outs = [o for o in _as_tuple(outs) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    clock.stop()


def measure(fn, inputs, grad_key, mode, settings, cuda):
    """Median seconds over repeats, all the times, and the peak extra memory (bytes, CUDA only)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    warm = Clock(cuda)
    for _ in range(max(1, settings.warmup)):
        _one_call(fn, inputs, grad_key, mode, warm)
    warm_time = warm.elapsed()[-1]
    peak = torch.cuda.max_memory_allocated() - before if cuda else float("nan")
    repeats = settings.repeats if warm_time <= 0 else int(settings.max_case_seconds / warm_time)
    repeats = max(2, min(settings.repeats, repeats))
    clock = Clock(cuda)
    for _ in range(repeats):
        _one_call(fn, inputs, grad_key, mode, clock)
    times = clock.elapsed()
    return statistics.median(times), times, peak


def copy_bandwidth(tensor, cuda, repeats=5):
    """Bytes per second of `dst.copy_(src)` for a tensor like `tensor` (read + write counted)."""
    dst = torch.empty_like(tensor)
    dst.copy_(tensor)
    clock = Clock(cuda)
    for _ in range(repeats):
        clock.start()
        dst.copy_(tensor)
        clock.stop()
    del dst
    return 2 * tensor.numel() * tensor.element_size() / statistics.median(clock.elapsed())
