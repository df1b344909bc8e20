"""Ahead-of-time compile check of the Triton kernels for sm_80 and sm_90 (no GPU needed).

The compiles run in a subprocess with TRITON_INTERPRET=0: tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported, so in this process `@triton.jit` has made every
kernel an `InterpretedFunction`, which `triton.compile` cannot take (it has no `cache_key`,
and the jit helpers the kernels call are interpreted too). The mode is fixed per process
when the kernel modules are imported, so a fresh interpreter is the only clean way.

Default run: every kernel once per target at its most common specialisation (bf16, aligned,
largest block), plus kernels that must fail the check. `-m slow`: every specialisation the
launchers produce (`python -m fdpipe_kernels.aot`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not importable: nothing to compile")

from fdpipe_kernels import aot, launch  # noqa: E402  (after the skip)
from fdpipe_kernels import backend as kernel_backend  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ("sm_80", "sm_90")


def run_compiled(code: str, timeout: float) -> dict:
    """Run `code` in a fresh interpreter with compiled (not interpreted) kernels; it prints one JSON line."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_all_ok(rows):
    bad = [f"{r['kernel']} {r['dtype']} {r['layout']} {r['constexprs']} num_warps={r['num_warps']} "
           f"{r['target']}: {r['error']}" for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)
    for r in rows:
        assert r["registers"] is not None and r["registers"] > 0, r
        assert r["spills"] == 0, r
        assert r["shared"] <= aot.TARGETS[r["target"]].max_shared, r


# --- no compile: pure helpers, in this process ------------------------------------------

def test_target_limits():
    assert aot.TARGETS["sm_80"].max_shared == 166912
    assert aot.TARGETS["sm_90"].max_shared == 232448


@pytest.mark.parametrize("max_block", [aot.LOGPROBS_MAX_BLOCK, aot.DIVERGENCES_MAX_BLOCK])
def test_vocab_sizes_reach_every_block(max_block):
    sizes = aot.vocab_sizes(max_block)
    chosen = {launch.block_and_warps(v, max_block) for v in sizes}
    # every (block, warps) the launcher can pick for any vocabulary up to 4x the maximum
    possible = {launch.block_and_warps(v, max_block) for v in range(1, 4 * max_block)}
    assert chosen == possible and len(sizes) == len(chosen)


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers"""
    assert aot.parse_ptxas_log(log) == {"registers": 255, "stack": 8, "spill_stores": 12, "spill_loads": 16}
    assert aot.parse_ptxas_log("")["registers"] is None


# --- compiles, in a subprocess ------------------------------------------------------------

QUICK = """
import json
from dataclasses import asdict
from fdpipe_kernels import aot
specs = aot.quick()
rows = aot.check(specs, {targets!r})
print(json.dumps({{"defined": sorted(aot.defined_kernels()), "rows": [asdict(r) for r in rows]}}))
"""


def test_quick_every_kernel_compiles_for_sm80_and_sm90():
    out = run_compiled(QUICK.format(targets=TARGETS), timeout=300)
    rows = out["rows"]
    assert_all_ok(rows)
    assert len(out["defined"]) == 4
    for target in TARGETS:
        assert sorted(r["kernel"] for r in rows if r["target"] == target) == out["defined"]
    for r in rows:
        assert r["dtype"] == "bf16" and r["layout"] == "aligned"
        block = int(r["constexprs"].split("BLOCK=")[1].split(",")[0])
        max_block = aot.LOGPROBS_MAX_BLOCK if "logprobs" in r["kernel"] else aot.DIVERGENCES_MAX_BLOCK
        assert block == max_block and r["num_warps"] == launch.block_and_warps(block, max_block)[1]


@pytest.mark.skipif(not kernel_backend.INTERPRETED, reason="shows what TRITON_INTERPRET=1 lets through")
def test_interpreter_runs_broken_kernels():
    """What the compile check must catch runs without complaint in the interpreter (CPU tensors)."""
    import dataclasses

    import aot_broken

    for name, recorded in aot_broken.launches(device="cpu").items():
        recorded()
        dataclasses.replace(recorded, num_warps=3)()


BROKEN = """
import json
from dataclasses import asdict
import aot_broken
from fdpipe_kernels import aot
rows = {}
with aot.fresh_cache():
    for name, recorded in aot_broken.launches().items():
        spec = aot.spec_from_launch(recorded)
        rows[name] = asdict(aot.compile_spec(spec, "sm_90"))
    # a launcher asking for an invalid number of warps: a real kernel, its common specialisation
    spec = [s for s in aot.quick() if s.name == "_token_logprobs_forward_kernel"][0]
    for warps in (3, 64):
        spec.num_warps = warps
        rows[f"num_warps={warps}"] = asdict(aot.compile_spec(spec, "sm_90"))
print(json.dumps(rows))
"""


def test_check_rejects_broken_kernels():
    """The test of the test: each of these compiles under TRITON_INTERPRET=1 semantics or is legal Python."""
    rows = run_compiled(BROKEN, timeout=300)
    for name, row in rows.items():
        assert not row["ok"], (name, row)
    assert "compile error" in rows["int_accumulator"]["problems"]
    assert "acc" in rows["int_accumulator"]["error"], rows["int_accumulator"]["error"]
    assert "compile error" in rows["mismatched_branch"]["problems"]
    assert "value" in rows["mismatched_branch"]["error"], rows["mismatched_branch"]["error"]
    hog = rows["shared_hog"]
    assert hog["error"] and hog["shared"] is not None and hog["shared"] > aot.TARGETS["sm_90"].max_shared, hog
    assert "power of 2" in rows["num_warps=3"]["error"], rows["num_warps=3"]
    assert "2048 threads per block > 1024" in rows["num_warps=64"]["error"], rows["num_warps=64"]


FULL = """
import json, time
from dataclasses import asdict
from fdpipe_kernels import aot
start = time.perf_counter()
rows = aot.check(aot.specialisations(), [{target!r}], jobs={jobs})
print(json.dumps({{"summary": aot.summary(rows), "total_seconds": round(time.perf_counter() - start, 1),
                  "rows": [asdict(r) for r in rows]}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_every_specialisation_compiles(target):
    """The full set, as `python -m fdpipe_kernels.aot --target <target>` (minutes per target)."""
    out = run_compiled(FULL.format(target=target, jobs=min(4, os.cpu_count() or 1)), timeout=3600)
    rows = out["rows"]
    assert_all_ok(rows)
    summary = out["summary"][target]
    print(f"\n{target}: {summary}, total {out['total_seconds']} s")
    kernels = {r["kernel"] for r in rows}
    assert len(kernels) == 4
    for name in kernels:
        assert {r["dtype"] for r in rows if r["kernel"] == name} >= {aot.DTYPE_NAMES[d] for d in launch.KERNEL_DTYPES}
