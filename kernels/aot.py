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
import math
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from . import launch
from .backend import HAS_TRITON, INTERPRETED
from .linear_token_logprobs import linear_token_logprobs_triton
from .token_divergences import MAX_BLOCK as DIVERGENCES_MAX_BLOCK
from .token_divergences import token_divergences_triton
from .token_logprobs import MAX_BLOCK as LOGPROBS_MAX_BLOCK
from .token_logprobs import token_logprobs_triton


@dataclass(frozen=True)
class Target:
    """A compile target and the per-block limits its launches must respect."""

    name: str
    arch: int
    max_shared: int  # bytes of shared memory per block (opt-in maximum)
    max_threads: int = 1024
    warp_size: int = 32


TARGETS = {
    "sm_80": Target("sm_80", 80, 163 * 1024),  # A100: 163 KiB = 166912 bytes
    "sm_90": Target("sm_90", 90, 227 * 1024),  # H100/H200: 227 KiB = 232448 bytes
}
LAYOUTS = ("aligned", "unaligned")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Spec:
    """One specialisation of one kernel, as Triton's launcher would compile it."""

    kernel: object  # the JITFunction
    signature: dict  # parameter name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # parameter name -> value (the kernel's constexprs and integers specialised to 1)
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] for arguments divisible by 16
    num_warps: int
    op: str = ""  # the public function (and flags) whose launch produced it first
    dtype: str = ""  # input dtype(s) of that call
    layout: str = ""
    vocab: int = 0
    sources: int = 1  # how many enumerated calls produce this exact specialisation

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def __getstate__(self):
        # a JITFunction does not pickle: send where to import it from (worker processes)
        state = dict(self.__dict__)
        state["kernel"] = (self.kernel.fn.__module__, self.kernel.fn.__name__)
        return state

    def __setstate__(self, state):
        import importlib

        module, name = state["kernel"]
        self.__dict__.update(state, kernel=getattr(importlib.import_module(module), name))

    def key(self) -> tuple:
        return (self.name, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())), self.num_warps)

    def declared(self) -> set[str]:
        """Names of the kernel's `tl.constexpr` parameters."""
        return {p.name for p in self.kernel.params if p.is_constexpr}

    def kernel_constexprs(self) -> dict:
        """The constexprs the launcher chose (BLOCK, flags), without the integers specialised to 1."""
        declared = self.declared()
        return {k: v for k, v in self.constexprs.items() if k in declared}

    def args(self) -> str:
        """Compact argument specialisation: type, ':16' when divisible by 16, '=1' when specialised to 1."""
        declared = self.declared()
        parts = []
        for i, (n, t) in enumerate(self.signature.items()):
            if n in declared:
                continue
            if n in self.constexprs:
                parts.append(f"{n}={self.constexprs[n]}")
            else:
                hint = ":16" if any(a[0] == "tt.divisibility" for a in self.attrs.get((i,), [])) else ""
                parts.append(f"{t}{hint}")
        return " ".join(parts)


@dataclass
class Result:
    """One row of the report."""

    kernel: str
    op: str
    dtype: str
    layout: str
    vocab: int
    constexprs: str
    num_warps: int
    target: str
    args: str = ""
    registers: int | None = None
    spills: int | None = None  # bytes of spill stores + spill loads
    stack: int | None = None  # bytes of stack frame
    shared: int | None = None  # bytes of shared memory per block
    seconds: float = 0.0
    ok: bool = False
    error: str = ""  # compile error, or the limits the compiled kernel breaks
    problems: list[str] = field(default_factory=list)


# --- enumeration ---------------------------------------------------------------------

def _require_compiled_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("fdpipe_kernels.aot needs triton (pip install triton)")
    if INTERPRETED:
        raise RuntimeError("fdpipe_kernels.aot compiles kernels, but TRITON_INTERPRET=1 made them interpreted; "
                           "run it in a process with TRITON_INTERPRET=0")


@contextlib.contextmanager
def _quiet():
    """Silence Triton 3.9's notice that TRITON_DEFAULT_FP_FUSION is unset (the launch sees the same default)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        yield


def _backend(arch: int = 90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def spec_from_launch(recorded: launch.Launch, **labels) -> Spec:
    """Specialise a `Launch` the way `JITFunction.run` does before it compiles (no device needed).

    `num_warps` is kept as the launcher chose it; an invalid value fails in `compile_spec`.
    """
    from triton.runtime.jit import create_function_from_signature

    _require_compiled_triton()
    kernel = recorded.kernel
    backend = _backend()
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(recorded.constexprs)
    with _quiet():
        bound, specialization, options = binder(*recorded.args, **kwargs)
        _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    return Spec(kernel=kernel, signature=signature,
                constexprs={names[path[0]]: value for path, value in constexprs.items()},
                attrs={path: value for path, value in attrs.items() if value},
                num_warps=recorded.num_warps, **labels)


def defined_kernels() -> set[str]:
    """Names of the Triton kernels (`_<op>_forward_kernel`, ...) defined in the op modules."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    package = sys.modules[__package__]
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name in ("aot", "__main__"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.__module__ == module.__name__:
                names.add(name)
    return names


def vocab_sizes(max_block: int) -> list[int]:
    """One vocabulary size per (block, warps) choice of `launch.block_and_warps`: 1, 2, 4, ... max_block."""
    sizes, n = [], 1
    while True:
        sizes.append(n)
        if launch.block_and_warps(n, max_block)[0] >= max_block:
            return sizes
        n *= 2


def _vocab(block_size: int, layout: str) -> int:
    """A vocabulary that gets `block_size`: the block itself, or an odd size in (block/2, block)."""
    if layout == "unaligned" and block_size - 1 > block_size // 2:
        return block_size - 1
    return block_size


def _input(shape, dtype, layout, requires_grad=False) -> torch.Tensor:
    """A meta tensor, fresh (aligned) or a view one element into its storage (unaligned)."""
    if layout == "aligned":
        x = torch.empty(shape, dtype=dtype, device="meta")
    else:
        x = torch.empty(math.prod(shape) + 1, dtype=dtype, device="meta")[1:].view(shape)
    return x.requires_grad_(requires_grad)


def _backward(outputs) -> None:
    sum(v.sum() for v in outputs).backward()


def _calls(dtypes, layouts):
    """(op label, dtype label, layout, vocab, call) for every enumerated public call."""
    for layout in layouts:
        rows = 16 if layout == "aligned" else 7
        for dtype in dtypes:
            dname = DTYPE_NAMES[dtype]
            for block_size in vocab_sizes(LOGPROBS_MAX_BLOCK):
                vocab = _vocab(block_size, layout)
                for with_entropy in (False, True):
                    def tok(dtype=dtype, vocab=vocab, with_entropy=with_entropy, layout=layout, rows=rows):
                        logits = _input((rows, vocab), dtype, layout, requires_grad=True)
                        targets = _input((rows,), torch.int64, layout)
                        out = token_logprobs_triton(logits, targets, with_entropy=with_entropy)
                        _backward(out if with_entropy else (out,))

                    def head(dtype=dtype, vocab=vocab, with_entropy=with_entropy, layout=layout, rows=rows):
                        hidden = _input((rows, 8), dtype, layout, requires_grad=True)
                        weight = torch.empty((vocab, 8), dtype=dtype, device="meta", requires_grad=True)
                        targets = _input((rows,), torch.int64, layout)
                        out = linear_token_logprobs_triton(hidden, weight, targets, with_entropy=with_entropy)
                        _backward(out if with_entropy else (out,))

                    flag = f"(with_entropy={with_entropy})"
                    yield "token_logprobs" + flag, dname, layout, vocab, tok
                    yield "linear_token_logprobs" + flag, dname, layout, vocab, head
        for dtype in dtypes:
            for ref_dtype in dtypes:
                dname = DTYPE_NAMES[dtype] if dtype == ref_dtype else f"{DTYPE_NAMES[dtype]}+{DTYPE_NAMES[ref_dtype]}"
                for block_size in vocab_sizes(DIVERGENCES_MAX_BLOCK):
                    vocab = _vocab(block_size, layout)

                    def div(dtype=dtype, ref_dtype=ref_dtype, vocab=vocab, layout=layout, rows=rows):
                        logits = _input((rows, vocab), dtype, layout, requires_grad=True)
                        ref = _input((rows, vocab), ref_dtype, layout)
                        mask = _input((rows,), torch.bool, layout)
                        _backward(token_divergences_triton(logits, ref, mask=mask))

                    yield "token_divergences", dname, layout, vocab, div


def specialisations(dtypes=launch.KERNEL_DTYPES, layouts=LAYOUTS) -> list[Spec]:
    """Every distinct specialisation the public Triton paths launch, in enumeration order."""
    _require_compiled_triton()
    found: dict[tuple, Spec] = {}
    for op, dname, layout, vocab, call in _calls(dtypes, layouts):
        with launch.recorded_launches() as launches:
            call()
        if not launches:
            raise RuntimeError(f"{op} {dname} {layout} V={vocab}: no kernel launch recorded")
        for recorded in launches:
            spec = spec_from_launch(recorded, op=op, dtype=dname, layout=layout, vocab=vocab)
            key = spec.key()
            if key in found:
                found[key].sources += 1
            else:
                found[key] = spec
    return list(found.values())


QUICK_DTYPE, QUICK_LAYOUT = torch.bfloat16, "aligned"


def quick(specs: list[Spec] | None = None) -> list[Spec]:
    """One specialisation per kernel, the most common in training: bf16, aligned, the largest block.

    Without `specs`, enumerates only that dtype and layout (seconds instead of the full set).
    """
    if specs is None:
        specs = specialisations(dtypes=(QUICK_DTYPE,), layouts=(QUICK_LAYOUT,))

    def rank(spec: Spec):
        cx = spec.kernel_constexprs()
        return (spec.dtype != DTYPE_NAMES[QUICK_DTYPE], spec.layout != QUICK_LAYOUT, -cx.get("BLOCK", 0),
                sum(1 for v in cx.values() if v is True))

    chosen: dict[str, Spec] = {}
    for spec in specs:
        if spec.name not in chosen or rank(spec) < rank(chosen[spec.name]):
            chosen[spec.name] = spec
    return list(chosen.values())


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
