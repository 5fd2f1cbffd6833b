#!/usr/bin/env bash
# One command on the GPU machine: correctness tests, then the benchmarks; logs and JSON under $OUT (or ./gpu_out).
# Usage: bash benchmarks/gpu_run.sh [gpu_bench.py flags...]
# Wheels of packages the machine lacks (gguf) may be placed in .whl/; they are installed to /tmp/site first.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=src:/tmp/site
else
  export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# a test that hangs on the GPU (a kernel waiting forever) ends its worker after 120 s; the others go on
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120 --timeout-method thread")
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/test_triton_kernels.py tests/test_gpu_engine.py -q -n 8 \
  -p no:cacheprovider $per_test >"$OUT/pytest.log" 2>&1
tail -25 "$OUT/pytest.log"
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/gpu_bench.py --out "$OUT/bench.json" "$@" >"$OUT/bench.log" 2>&1
tail -60 "$OUT/bench.log"
