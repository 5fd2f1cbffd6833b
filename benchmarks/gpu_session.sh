#!/usr/bin/env bash
# Every GPU figure in one command, for a machine held for a fixed time: the Triton/engine tests and
# benchmarks/gpu_bench.py (through gpu_run.sh), then the training step benchmark. Each stage has its own
# limit, so a slow stage cannot eat the next one's time; results land in $OUT as at most six files.
#
#     OUT=gpu_out bash benchmarks/gpu_session.sh          # ~7 minutes on an H200
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$OUT TEST_TIMEOUT=${TEST_TIMEOUT:-150} BENCH_TIMEOUT=${BENCH_TIMEOUT:-260} \
  bash benchmarks/gpu_run.sh --precompile 12
# the reference kind (torch straight-through) times like nn.Linear compiled; leaving it out keeps the stage
# (three kinds, their 200-step loss curves and the noise-floor curve) near 3 minutes
# TRAIN_ARGS adds flags, e.g. TRAIN_ARGS="--checkpointing mlp --curve-steps 0"
PYTHONPATH=src timeout "${TRAIN_TIMEOUT:-200}" python3 benchmarks/train_bitlinear_speed.py \
  --kinds linear,int8,int8-gx8 ${TRAIN_ARGS:-} --out "$OUT/train_speed.json" >"$OUT/train_speed.log" 2>&1
tail -30 "$OUT/train_speed.log"
