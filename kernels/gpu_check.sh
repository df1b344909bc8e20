#!/usr/bin/env bash
# One command for a CUDA machine: the kernel tests on the GPU (compiled Triton, bf16/fp16,
# the full 50257 vocabulary, peak-memory checks), then the full benchmark.
#
#   PYTHONPATH=. bash kernels/gpu_check.sh [OUT_DIR]      (OUT_DIR defaults to results/bench)
#
# Needs torch with CUDA, triton and pytest; no `pip install` of this project. The folder
# kernels/ is imported as `fdpipe_kernels` (the name `kernels` belongs to another PyPI
# distribution), so the script puts a temporary folder holding the link
# fdpipe_kernels -> kernels/ on PYTHONPATH, followed by the repository root (for `fdpipe`).
# Liger-Kernel is used when importable, or when a wheel liger_kernel-*.whl lies in wheels/ or
# shared/wheels/ (it is unpacked into a temporary folder and put on PYTHONPATH).
# Writes OUT_DIR/gpu_tests.log, OUT_DIR/kernels.parquet, OUT_DIR/bench.log and
# OUT_DIR/BENCHMARKS.md, and copies the latter to kernels/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT_DIR="${1:-results/bench}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT_DIR"

TMP_DIRS=()
trap 'rm -rf "${TMP_DIRS[@]}"' EXIT
import_dir="$(mktemp -d)"
TMP_DIRS+=("$import_dir")
ln -s "$ROOT/kernels" "$import_dir/fdpipe_kernels"
export PYTHONPATH="$import_dir:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # compiled kernels (tests/conftest.py only sets 1 when it is unset)

for wheel in wheels/liger_kernel-*.whl shared/wheels/liger_kernel-*.whl; do
    if [ -f "$wheel" ]; then
        unpacked="$(mktemp -d)"
        TMP_DIRS+=("$unpacked")
        "$PYTHON" -m zipfile -e "$wheel" "$unpacked"
        export PYTHONPATH="$PYTHONPATH:$unpacked"
        echo "liger-kernel from $wheel"
        break
    fi
done

"$PYTHON" - <<'PY'
import fdpipe, fdpipe_kernels, torch
print("fdpipe_kernels from", fdpipe_kernels.__path__[0], "| fdpipe from", fdpipe.__path__[0])
assert torch.cuda.is_available(), "kernels/gpu_check.sh: no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

status=0
"$PYTHON" -m pytest tests/kernels -q -p no:cacheprovider -rs 2>&1 | tee "$OUT_DIR/gpu_tests.log" || status=$?
"$PYTHON" -m fdpipe_kernels.bench --out "$OUT_DIR/kernels.parquet" --markdown "$OUT_DIR/BENCHMARKS.md" 2>&1 \
    | tee "$OUT_DIR/bench.log"
cp "$OUT_DIR/BENCHMARKS.md" kernels/BENCHMARKS.md
echo "tests exit status: $status; results in $OUT_DIR"
exit "$status"
