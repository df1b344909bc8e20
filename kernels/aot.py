"""Ahead-of-time compile check: every kernel specialisation the launchers produce, for sm_80 and sm_90.

Triton compiles without a GPU or a CUDA driver: `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))` runs TTIR -> TTGIR -> LLIR -> PTX -> cubin with the
`ptxas` bundled in the Triton wheel. This module

1. enumerates the specialisations: it calls the public Triton paths (`token_logprobs`,
   `linear_token_logprobs`, `token_divergences`, forward and backward) on `meta` tensors
   inside `launch.recorded_launches()`, over every input dtype in `launch.KERNEL_DTYPES`
   (both orders of mixed dtypes for the two rows of `token_divergences`), both values of
   `with_entropy`, one vocabulary size per block the launcher can choose (powers of two up
   to each op's `MAX_BLOCK`) and two memory layouts. Each recorded `Launch` is specialised
   with Triton's own launch-time binder, so the signature (pointer element types, i32/i64),
   the divisibility-by-16 hints, the integers specialised to 1, the constexprs and
   `num_warps` are the ones a launch on a GPU would compile; duplicates are merged.
   Layouts: `aligned` = fresh inputs, 16 rows, vocabulary (and row strides) a multiple of
   16 where the block allows it (Llama/Qwen vocabularies); `unaligned` = inputs that are
   views one element into their storage, 7 rows, an odd vocabulary (GPT-2's 50257).
   Launches mixing aligned and unaligned pointers fall between the two and are not
   enumerated one by one.
2. compiles each for a target and reads registers and spills from the `ptxas -v` log,
   shared memory from the kernel's metadata, and checks: no spill, shared memory within
   the target's per-block opt-in maximum, at most 1024 threads per block.

`python -m fdpipe_kernels.aot [--target sm_80] [--target sm_90] [--quick] [--jobs N] [--json PATH]`
prints one row per specialisation and exits 1 when any fails. Kernels must be compiled,
not interpreted: run it with `TRITON_INTERPRET` unset or 0 (the test suite sets 1, so
`tests/kernels/test_aot.py` runs this in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict

from .aot_specs import (  # noqa: F401  (the enumeration is part of this module's API)
    DIVERGENCES_MAX_BLOCK, DTYPE_NAMES, LAYOUTS, LOGPROBS_MAX_BLOCK, TARGETS, Result, Spec, Target, _quiet,
    _require_compiled_triton, defined_kernels, quick, spec_from_launch, specialisations, vocab_sizes,
)

# --- compilation ---------------------------------------------------------------------

_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack and spill bytes from a `ptxas -v` log (None where absent)."""
    found = {}
    for name, pattern in _PTXAS.items():
        values = [int(v) for v in pattern.findall(log)]
        found[name] = max(values) if values else None
    return found


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:6])[:600]


def compile_spec(spec: Spec, target: Target | str) -> Result:
    """Compile one specialisation for `target` and check it against the target's limits."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = TARGETS[target] if isinstance(target, str) else target
    cx = spec.kernel_constexprs()
    row = Result(kernel=spec.name, op=spec.op, dtype=spec.dtype, layout=spec.layout, vocab=spec.vocab,
                 constexprs=",".join(f"{k}={v}" for k, v in cx.items()), num_warps=spec.num_warps,
                 target=target.name, args=spec.args())
    log = io.StringIO()
    previous_dump = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output is printed; captured below
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), _quiet():
            compiled = triton.compile(
                ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                target=GPUTarget("cuda", target.arch, target.warp_size),
                options={"num_warps": spec.num_warps},
            )
    except Exception as error:  # noqa: BLE001  (every compile failure is a row of the report)
        row.seconds = time.perf_counter() - start
        row.error = _one_line(error)
        row.problems.append("compile error")
        return row
    finally:
        knobs.nvidia.dump_ptxas_log = previous_dump
    row.seconds = time.perf_counter() - start
    usage = parse_ptxas_log(log.getvalue())
    row.registers, row.stack = usage["registers"], usage["stack"]
    if usage["spill_stores"] is not None or usage["spill_loads"] is not None:
        row.spills = (usage["spill_stores"] or 0) + (usage["spill_loads"] or 0)
    row.shared = int(compiled.metadata.shared or 0)
    threads = compiled.metadata.num_warps * target.warp_size
    if row.registers is None:
        row.problems.append("no register count in the ptxas log")
    if row.spills:
        row.problems.append(f"spills {row.spills} bytes")
    if row.shared > target.max_shared:
        row.problems.append(f"shared memory {row.shared} > {target.max_shared} bytes")
    if threads > target.max_threads:
        row.problems.append(f"{threads} threads per block > {target.max_threads}")
    row.error = "; ".join(row.problems)
    row.ok = not row.problems
    return row


@contextlib.contextmanager
def fresh_cache(parent: str | None = None):
    """A throwaway Triton cache, so that every specialisation really compiles (and is timed)."""
    from triton import knobs

    previous = knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="fdpipe-aot-", dir=parent) as path:
        knobs.cache.dir = path
        try:
            yield path
        finally:
            knobs.cache.dir = previous


def _worker_init(cache_root: str) -> None:
    from triton import knobs

    knobs.cache.dir = tempfile.mkdtemp(dir=cache_root)


def _compile_job(job: tuple[Spec, str]) -> Result:
    return compile_spec(*job)


def check(specs: list[Spec], targets=("sm_80", "sm_90"), jobs: int = 1, progress=None) -> list[Result]:
    """Compile every spec for every target (in a fresh cache); one `Result` per pair, in order.

    `jobs` > 1 compiles in that many worker processes (spawned: each imports the kernels anew).
    """
    work = [(spec, name) for name in targets for spec in specs]
    results = []
    with tempfile.TemporaryDirectory(prefix="fdpipe-aot-") as root:
        if jobs <= 1:
            with fresh_cache(root):
                for job in work:
                    results.append(_compile_job(job))
                    if progress:
                        progress(results[-1])
            return results
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(root,)) as pool:
            for row in pool.map(_compile_job, work, chunksize=4):
                results.append(row)
                if progress:
                    progress(row)
    return results


# --- report --------------------------------------------------------------------------

COLUMNS = ("kernel", "dtype", "layout", "constexprs", "num_warps", "target", "registers", "spills", "shared",
           "seconds", "ok")


def format_table(results: list[Result]) -> str:
    rows = [COLUMNS] + [
        tuple("ok" if c == "ok" and r.ok else "FAIL" if c == "ok" else
              f"{r.seconds:.2f}" if c == "seconds" else "-" if getattr(r, c) is None else str(getattr(r, c))
              for c in COLUMNS)
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"  {r.kernel} {r.dtype} {r.layout} {r.constexprs} {r.target}: {r.error}" for r in results if not r.ok]
    return "\n".join(lines)


def summary(results: list[Result]) -> dict:
    """Counts and times per target."""
    out = {}
    for name in dict.fromkeys(r.target for r in results):
        rows = [r for r in results if r.target == name]
        out[name] = {
            "specialisations": len(rows),
            "failed": sum(not r.ok for r in rows),
            "seconds": round(sum(r.seconds for r in rows), 1),
            "max_registers": max((r.registers or 0 for r in rows), default=0),
            "max_shared": max((r.shared or 0 for r in rows), default=0),
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdpipe_kernels.aot",
        description="Compile every kernel specialisation the launchers produce for sm_80/sm_90, without a GPU.")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="target to compile for (repeatable; default: sm_80 and sm_90)")
    parser.add_argument("--quick", action="store_true", help="one specialisation per kernel (bf16, aligned, largest block)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the summary as JSON ('-' for stdout)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    parser.add_argument("--list", action="store_true", help="only list the specialisations, compile nothing")
    args = parser.parse_args(argv)
    try:
        _require_compiled_triton()
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2
    targets = args.target or ["sm_80", "sm_90"]
    started = time.perf_counter()
    specs = quick() if args.quick else specialisations()
    missing = sorted(defined_kernels() - {s.name for s in specs})
    if missing:
        print(f"kernels that no enumerated call launches: {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.list:
        for s in specs:
            print(s.name, s.op, s.dtype, s.layout, f"V={s.vocab}", s.kernel_constexprs(),
                  f"num_warps={s.num_warps}", s.args())
        print(f"{len(specs)} specialisations", file=sys.stderr)
        return 0
    enumerated = time.perf_counter() - started
    results = check(specs, targets, jobs=args.jobs)
    elapsed = time.perf_counter() - started
    report = {"summary": summary(results), "enumerate_seconds": round(enumerated, 1),
              "total_seconds": round(elapsed, 1), "rows": [asdict(r) for r in results]}
    if args.json == "-":
        json.dump(report, sys.stdout)
        print()
    else:
        print(format_table(results))
        for name, s in report["summary"].items():
            print(f"{name}: {s['specialisations']} specialisations, {s['failed']} failed, {s['seconds']} s compiling, "
                  f"max {s['max_registers']} registers, max {s['max_shared']} bytes shared")
        print(f"total {elapsed:.1f} s (enumeration {enumerated:.1f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
