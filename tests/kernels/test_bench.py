"""The benchmark harness runs its smoke configuration to completion and writes its outputs."""
import subprocess
import sys

import pytest

from fdpipe.common.io import read_metadata, read_parquet
from fdpipe_kernels import bench


def test_smoke_benchmark_writes_parquet_and_markdown(tmp_path):
    out, md = tmp_path / "kernels.parquet", tmp_path / "BENCHMARKS.md"
    bench.main(["--smoke", "--out", str(out), "--markdown", str(md)])
    df = read_parquet(out)
    assert set(df["op"]) == set(bench.OPS)
    assert set(df["mode"]) == set(bench.MODES)
    assert set(df["impl"]) == {"fdpipe", "eager"}
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]
    assert (df["median_ms"] > 0).all() and (df["repeats"] >= 2).all()
    ours = df[df["impl"] == "fdpipe"]
    assert ours["speedup_vs_eager"].notna().all() and df[df["impl"] == "eager"]["speedup_vs_eager"].isna().all()
    linear = df["op"] == "linear_token_logprobs"
    assert df.loc[linear, "tflops"].gt(0).all() and df.loc[~linear, "bandwidth_fraction"].gt(0).all()
    meta = read_metadata(out)
    assert meta["device"].startswith("CPU") and "torch" in meta["packages"] and meta["config"]["n_tokens"] == [64, 256]
    assert meta["settings"] == meta["config"] and meta["seed"] == 0 and len(meta["config_hash"]) == 16
    assert meta["code_version"] and meta["created_utc"] and set(meta["packages"]) >= {"torch", "pandas", "pyarrow"}
    text = md.read_text()
    assert "CPU smoke configuration" in text and "## linear_token_logprobs" in text


def test_settings_from_config_and_validation():
    settings = bench.settings_from_config({"seed": 3, "smoke": {"vocab": [10]}, "full": {"repeats": 4}}, cuda=False)
    assert settings.vocab == [10] and settings.seed == 3 and settings.repeats == bench.SMOKE.repeats
    full = bench.settings_from_config({"full": {"repeats": 4}}, cuda=True)
    assert full.repeats == 4 and full.n_tokens == [4096, 16384, 32768] and full.hidden == 4096
    with pytest.raises(ValueError, match="benchmark.ops"):
        bench.run(bench.BenchSettings(ops=["softmax"]), "cpu")


def test_kernels_package_imports_nothing_from_fdpipe():
    """fdpipe_kernels stands alone: importing every module of it loads no `fdpipe` module."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import fdpipe_kernels\n"
        "for info in pkgutil.walk_packages(fdpipe_kernels.__path__, 'fdpipe_kernels.'):\n"
        "    if not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "print(sorted(m for m in sys.modules if m == 'fdpipe' or m.startswith('fdpipe.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
