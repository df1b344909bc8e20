"""What the compile check compiles: every specialisation the kernel launchers produce.

Part of `fdpipe_kernels.aot` (see its docstring); split out so that each file stays small.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass, field

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
