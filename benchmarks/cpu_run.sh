#!/usr/bin/env bash
# benchmarks/cpu_vs_llamacpp.py on a machine without registry access (for instance a GPU machine's host CPU,
# to measure the AVX-512 VNNI path where the development machine has AVX2 only). Wheels the machine lacks go in
# .whl/ (llama-cpp-python built for that CPU, e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON
# -DGGML_AVX512_VNNI=ON ..."; diskcache; gguf); the package is built from this tree into /tmp/site. The runs are
# pinned to THREADS distinct physical cores: the comparison, then the decode GEMV's ceiling and where a decode
# step's time goes; results and the CPU's description land in $OUT.
#
#     OUT=cpu_out THREADS=2 bash benchmarks/cpu_run.sh          # ~5 minutes
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-cpu_out}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if ! python3 -m pip install -q --no-build-isolation --no-deps --no-compile --upgrade --target /tmp/site . \
  >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  exit 1
fi
lscpu >"$OUT/lscpu.txt"
grep -m1 "Model name" "$OUT/lscpu.txt"
grep -ow "avx2\|avx512_vnni\|avx_vnni\|amx_int8" "$OUT/lscpu.txt" | sort -u | tr '\n' ' '
echo
# one logical CPU from each of the first THREADS cores
cpus=$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -n "$THREADS" | cut -d, -f1 | paste -sd,)
echo "pinned to CPUs $cpus"
PYTHONPATH=/tmp/site timeout "${BENCH_TIMEOUT:-300}" taskset -c "$cpus" \
  python3 benchmarks/cpu_vs_llamacpp.py --threads "$THREADS" >"$OUT/cpu_vs_llamacpp.log" 2>&1
rc=$?
tail -20 "$OUT/cpu_vs_llamacpp.log"
PYTHONPATH=/tmp/site timeout 150 taskset -c "$cpus" python3 benchmarks/cpu_gemv_ceiling.py --threads "1,$THREADS" \
  2>&1 | tee "$OUT/ceiling.log"
PYTHONPATH=/tmp/site timeout 150 taskset -c "$cpus" python3 benchmarks/cpu_decode_profile.py --threads "$THREADS" \
  2>&1 | tee "$OUT/decode_profile.log" | head -6
exit $rc
