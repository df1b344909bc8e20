"""Benchmark of the kernel ops against eager torch, torch.compile and Liger-Kernel.

`python -m kernels.bench` measures every op (token_logprobs, token_divergences,
linear_token_logprobs) in four modes -- forward (inputs require grad), backward (the
forward runs untimed first), forward_backward, no_grad -- over a grid of token counts N,
vocabulary sizes V and dtypes, on realistic peaked logits. Baselines run in the same process
on the same inputs: eager torch (log_softmax + gather; textbook divergences), torch.compile
of the same functions (only at one headline shape, to fit a time budget) and Liger-Kernel
(cross entropy / fused linear cross entropy with reduction='none' read as -log p,
LigerJSD on log_softmax outputs; CUDA only).

Each row records the median time, the effective bandwidth (the minimum bytes the op must
move, divided by the time) as a fraction of the device's copy bandwidth (a torch copy of a
tensor of the logits' size, measured in the same run), for the LM head the TFLOP/s, the peak
extra memory, and on fdpipe rows the speedups over each baseline. Results go to a Parquet
file (with provenance) and a Markdown table.

Without CUDA it runs a smoke configuration (tiny shapes, the torch reference and eager only)
that finishes in seconds; the numbers then only show that the harness works.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import logging
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd
import torch

import fdpipe_kernels as kernels
from fdpipe_kernels import backend as kernel_backend

log = logging.getLogger("fdpipe.bench")

OPS = ("token_logprobs", "token_divergences", "linear_token_logprobs")
MODES = ("forward", "backward", "forward_backward", "no_grad")
BASELINES = ("eager", "compile", "liger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSettings:
    """What to measure. Defaults are the full GPU grid; `SMOKE` is the CPU configuration."""

    ops: list = field(default_factory=lambda: list(OPS))
    modes: list = field(default_factory=lambda: list(MODES))
    n_tokens: list = field(default_factory=lambda: [4096, 16384, 32768])
    vocab: list = field(default_factory=lambda: [32000, 50257, 128256, 151936])
    dtypes: list = field(default_factory=lambda: ["bfloat16", "float32"])
    baselines: list = field(default_factory=lambda: list(BASELINES))
    hidden: int = 4096
    # The LM head is compute-bound (4 matmuls of 2*N*V*H FLOP for forward+backward), so it
    # runs on a smaller grid, and in float32 (no TF32) only up to this many tokens.
    linear_n_tokens: list = field(default_factory=lambda: [4096, 16384])
    linear_vocab: list = field(default_factory=lambda: [32000, 128256])
    linear_float32_max_tokens: int = 4096
    compile_shape: list = field(default_factory=lambda: [16384, 128256])
    compile_dtypes: list = field(default_factory=lambda: ["bfloat16"])
    warmup: int = 2  # the first call compiles (Triton JIT, torch.compile); the last one sets the repeats
    repeats: int = 10
    max_case_seconds: float = 0.5  # fewer repeats (at least 2) when one call is slow
    threads: int = 0  # CPU threads for torch during the run (0 = leave as is)
    seed: int = 0


SMOKE = BenchSettings(
    n_tokens=[64, 256], vocab=[1000, 5000], dtypes=["float32"], baselines=["eager"], hidden=64,
    linear_n_tokens=[64, 256], linear_vocab=[1000, 5000], linear_float32_max_tokens=256,
    compile_shape=[], compile_dtypes=[], warmup=1, repeats=3, max_case_seconds=0.2, threads=1,
)


def settings_from_config(section: dict | None, cuda: bool) -> BenchSettings:
    """The config's `benchmark` section: `full` keys on CUDA, `smoke` keys otherwise."""
    section = section or {}
    base = BenchSettings() if cuda else BenchSettings(**asdict(SMOKE))
    overrides = section.get("full" if cuda else "smoke", {}) or {}
    known = {f.name for f in fields(BenchSettings)}
    values = {**asdict(base), **{k: v for k, v in overrides.items() if k in known}}
    if "seed" in section:
        values["seed"] = section["seed"]
    return BenchSettings(**values)


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
# Timing


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


# ---------------------------------------------------------------------------------------
# The grid


def cases(settings: BenchSettings):
    """(op, dtype name, n, v) in run order."""
    for op in settings.ops:
        for dtype in settings.dtypes:
            linear = op == "linear_token_logprobs"
            for n in (settings.linear_n_tokens if linear else settings.n_tokens):
                if linear and dtype == "float32" and n > settings.linear_float32_max_tokens:
                    continue
                for v in (settings.linear_vocab if linear else settings.vocab):
                    yield op, dtype, n, v


def _free(cuda):
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run(settings: BenchSettings, device: str | torch.device | None = None) -> tuple[pd.DataFrame, dict]:
    """Measure the grid; returns the tidy results and run facts (device, copy bandwidths)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and kernel_backend.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it (before importing kernels) to benchmark on CUDA")
    for key, allowed in (("ops", OPS), ("modes", MODES), ("dtypes", DTYPES), ("baselines", BASELINES)):
        bad = [x for x in getattr(settings, key) if x not in allowed]
        if bad:
            raise ValueError(f"benchmark.{key}: expected values among {', '.join(allowed)}, got {bad}")
    impls = implementations(settings, cuda)
    rows, bandwidths = [], {}
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        _run_cases(settings, device, cuda, impls, rows, bandwidths)
    finally:
        torch.set_num_threads(threads_before)
    df = add_speedups(pd.DataFrame(rows))
    facts = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                   f"torch threads: {settings.threads or threads_before})",
        "copy_gbps": {f"{numel}x{dt}": bw / 1e9 for (numel, dt), bw in bandwidths.items()},
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel"),
        "cuda": torch.version.cuda,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
    }
    return df, facts


def _run_cases(settings, device, cuda, impls, rows, bandwidths):
    """The measurement loop of `run`: appends one row per (case, impl, mode)."""
    for op, dtype_name, n, v in cases(settings):
        dtype = DTYPES[dtype_name]
        h = settings.hidden if op == "linear_token_logprobs" else 0
        key = (n * v, dtype_name)
        if key not in bandwidths:  # measured before the inputs exist, so that it fits
            try:
                bandwidths[key] = copy_bandwidth(torch.empty((n, v), dtype=dtype, device=device), cuda)
            except torch.cuda.OutOfMemoryError:
                bandwidths[key] = float("nan")
            _free(cuda)
        copy_bw = bandwidths[key]
        try:
            inputs = make_inputs(op, n, v, settings.hidden, dtype, device, settings.seed)
        except torch.cuda.OutOfMemoryError:
            log.warning("%s N=%d V=%d %s: inputs do not fit in memory", op, n, v, dtype_name)
            _free(cuda)
            continue
        grad_key = "hidden" if op == "linear_token_logprobs" else "logits"
        for impl, fn in impls[op].items():
            if impl == "compile" and not ([n, v] == list(settings.compile_shape) and dtype_name in settings.compile_dtypes):
                continue
            for mode in settings.modes:
                row = {"op": op, "impl": impl, "n_tokens": n, "vocab": v, "hidden": h, "dtype": dtype_name,
                       "mode": mode, "device": device.type,
                       "backend": ("triton" if kernel_backend.use_triton(*inputs.values()) else "torch")
                       if impl == "fdpipe" else impl}
                try:
                    median, times, peak = measure(fn, inputs, grad_key, mode, settings, cuda)
                except torch.cuda.OutOfMemoryError:
                    row.update(status="oom")
                    _free(cuda)
                except Exception as exc:  # a baseline that fails here is recorded, not fatal
                    row.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                    _free(cuda)
                else:
                    moved = min_bytes(op, mode, n, v, h, dtype.itemsize)
                    flops = useful_flops(op, mode, n, v, h)
                    row.update(status="ok", median_ms=median * 1e3, min_ms=min(times) * 1e3,
                               max_ms=max(times) * 1e3, repeats=len(times),
                               effective_gbps=moved / median / 1e9, copy_gbps=copy_bw / 1e9,
                               bandwidth_fraction=moved / median / copy_bw, tflops=flops / median / 1e12,
                               peak_extra_mb=peak / 2**20)
                rows.append(row)
                log.info("%-22s %-7s %-6s N=%-6d V=%-6d %-16s %s", op, impl, dtype_name, n, v, mode,
                         f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else row["status"])
        del inputs
        _free(cuda)


def _version(module):
    from importlib import metadata
    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return None


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """On fdpipe rows: baseline median time / fdpipe median time, per baseline (NaN if absent)."""
    if df.empty:
        return df
    keys = ["op", "n_tokens", "vocab", "dtype", "mode"]
    ok = df[df["status"] == "ok"] if "median_ms" in df else df.iloc[0:0]
    for baseline in BASELINES:
        base = ok[ok["impl"] == baseline][keys + ["median_ms"]].rename(columns={"median_ms": "_base"})
        merged = df.merge(base, on=keys, how="left")
        speed = merged["_base"] / merged.get("median_ms", float("nan"))
        df[f"speedup_vs_{baseline}"] = speed.where(merged["impl"] == "fdpipe").to_numpy()
    return df


# ---------------------------------------------------------------------------------------
# Reporting


def markdown(df: pd.DataFrame, facts: dict) -> str:
    """A Markdown page: run facts, then per op a table of fdpipe times and speedups per mode."""
    lines = ["# Kernel benchmarks", "",
             "Written by `python -m kernels.bench` (see kernels/README.md); the Parquet file beside the",
             "run output holds every row, including the baselines' own times.", "",
             f"- device: {facts['device']}",
             f"- torch {facts['torch']}, triton {facts['triton']}, liger-kernel {facts['liger_kernel']}, "
             f"CUDA {facts['cuda']}",
             f"- date (UTC): {facts['date_utc']}",
             f"- copy bandwidth measured in the same run (GB/s): "
             f"{', '.join(f'{v:.3g}' for v in sorted(set(facts['copy_gbps'].values())))}", ""]
    if not facts["device"].startswith("CPU"):
        lines += ["Times are medians in ms; `x eager` etc. are baseline time / fdpipe time (higher is "
                  "better for fdpipe); `bw` is the minimum bytes the op must move per second as a "
                  "fraction of copy bandwidth (LM head: TFLOP/s instead); `mem` is peak extra memory "
                  "in MiB.", ""]
    else:
        lines += ["**CPU smoke configuration.** No CUDA device: `fdpipe` here is the torch reference "
                  "path and the only baseline is eager torch, on tiny shapes. These numbers only show "
                  "that the harness runs; they say nothing about the Triton kernels. **GPU table pending:** "
                  "run `bash kernels/gpu_check.sh` on a CUDA machine to replace this page.", ""]
    if df.empty or "median_ms" not in df:
        return "\n".join(lines + ["(no successful measurements)", ""])
    ours = df[df["impl"] == "fdpipe"]
    for op in OPS:
        part = ours[ours["op"] == op]
        if part.empty:
            continue
        lines += [f"## {op}", ""]
        header = ["dtype", "N", "V", "mode", "fdpipe ms", "x eager", "x compile", "x liger",
                  "TFLOP/s" if op == "linear_token_logprobs" else "bw", "mem"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        part = part.assign(_mode=pd.Categorical(part["mode"], categories=list(MODES), ordered=True))
        for _, r in part.sort_values(["dtype", "n_tokens", "vocab", "_mode"]).iterrows():
            if r["status"] != "ok":
                cells = [r["dtype"], r["n_tokens"], r["vocab"], r["mode"], r["status"], "", "", "", "", ""]
            else:
                cells = [r["dtype"], r["n_tokens"], r["vocab"], r["mode"], f"{r['median_ms']:.3f}",
                         _fmt(r.get("speedup_vs_eager")), _fmt(r.get("speedup_vs_compile")),
                         _fmt(r.get("speedup_vs_liger")),
                         _fmt(r["tflops"] if op == "linear_token_logprobs" else r["bandwidth_fraction"]),
                         _fmt(r["peak_extra_mb"], "{:.0f}")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        lines += ["## Cases that did not run", ""]
        for _, r in bad.iterrows():
            lines.append(f"- {r['op']} {r['impl']} {r['dtype']} N={r['n_tokens']} V={r['vocab']} {r['mode']}: {r['status']}")
        lines.append("")
    return "\n".join(lines)


def _fmt(value, pattern="{:.2f}"):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def write_results(df, facts, parquet_path, markdown_path=None, config=None):
    """Parquet with provenance (fdpipe.io) and, when asked, the Markdown table."""
    from fdpipe.common.io import provenance, write_parquet

    meta = provenance(config if config is not None else facts["settings"], seed=facts["settings"]["seed"],
                      device=facts["device"], copy_gbps=facts["copy_gbps"], liger_kernel=facts["liger_kernel"],
                      cuda=facts["cuda"])
    write_parquet(df, parquet_path, meta)
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown(df, facts))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/bench/kernels.parquet", help="Parquet output")
    parser.add_argument("--markdown", default=None, help="also write this Markdown table (e.g. kernels/BENCHMARKS.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU configuration even when CUDA is present")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of timed repeats")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cuda = torch.cuda.is_available() and not args.smoke
    settings = BenchSettings() if cuda else BenchSettings(**asdict(SMOKE))
    if args.repeats:
        settings.repeats = args.repeats
    start = time.perf_counter()
    df, facts = run(settings, "cuda" if cuda else "cpu")
    write_results(df, facts, args.out, args.markdown)
    log.info("%d rows in %.1f s -> %s", len(df), time.perf_counter() - start, args.out)


if __name__ == "__main__":
    main()
