#!/usr/bin/env bash
# Build-time settings of the C kernels, compared on one machine: each argument is a set of C flags (an empty
# string: the defaults); each is built into its own folder, then the decode GEMV's ceiling and a decode step are
# timed for every build in turn, ROUNDS times (default 2; alternating, so a drift of a shared machine shows),
# pinned to THREADS distinct physical cores; PROFILE=0 times the GEMV ceiling only. Wheels the machine lacks
# may be placed in .whl/ (see cpu_run.sh).
#
#     OUT=sweep THREADS=2 bash benchmarks/cpu_build_sweep.sh "" "-DBN_GEMV_PREFETCH_HINT=_MM_HINT_T1" \
#         "-DBN_GEMV_PREFETCH=4096 -DBN_GEMV_PREFETCH_HINT=_MM_HINT_T1"
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-sweep}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
PROFILE=${PROFILE:-1}
mkdir -p "$OUT"
[ $# -gt 0 ] || set -- ""
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sweep-deps \
    .whl/*.whl >/dev/null 2>&1
fi
cpus=$(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | head -n "$THREADS" | cut -d, -f1 | paste -sd,)
echo "pinned to CPUs $cpus" | tee "$OUT/sweep.log"
trap 'rm -rf build-sweep' EXIT
i=0
for flags in "$@"; do
  rm -rf "/tmp/sweep-$i" build-sweep
  # a build folder of its own: an existing CMake cache would keep the flags of an earlier build
  if ! CMAKE_ARGS="-DCMAKE_C_FLAGS=$flags" python3 -m pip install -q --no-build-isolation --no-deps --no-compile \
    --config-settings=build-dir=build-sweep --target "/tmp/sweep-$i" . >"$OUT/build-$i.log" 2>&1; then
    tail -20 "$OUT/build-$i.log"
    echo "building with flags '$flags' failed; the whole log: $OUT/build-$i.log" >&2
    exit 1
  fi
  i=$((i + 1))
done
for round in $(seq "$ROUNDS"); do
  i=0
  for flags in "$@"; do
    echo "== round $round, flags '${flags:-defaults}'" | tee -a "$OUT/sweep.log"
    export PYTHONPATH="/tmp/sweep-$i:/tmp/sweep-deps"
    timeout 150 taskset -c "$cpus" python3 benchmarks/cpu_gemv_ceiling.py --threads "$THREADS" 2>&1 \
      | grep "thread(s)" | tee -a "$OUT/sweep.log"
    if [ "$PROFILE" != 0 ]; then
      timeout 150 taskset -c "$cpus" python3 benchmarks/cpu_decode_profile.py --threads "$THREADS" --tokens 48 \
        2>&1 | sed -n 2,5p | tee -a "$OUT/sweep.log"
    fi
    i=$((i + 1))
  done
done
