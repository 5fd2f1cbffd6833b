#!/usr/bin/env bash
# One command on a GPU machine: train the default model and its full-precision twins side by side
# (recipes/demo.yaml and recipes/demo-fp.yaml, through recipes/demo/train_gpus.py), then pack what comes back
# into a few files.
#
#     OUT=gpu_out BUDGET=430 bash recipes/demo/gpu_train.sh
#
# The corpus is read from out/demo-data, or unpacked from out/demo-data.tar.xz (made here by
# `tar -cJf out/demo-data.tar.xz -C out demo-data` after build_corpus.py). The runs stop at BUDGET
# seconds plus a minute of grace whatever happens, and the packing runs even if training fails, so a caller
# with a fixed allocation always gets the logs back: $OUT/logs.tar.gz (metrics, logs, recipes used) and
# $OUT/demo-hf.tar.gz (the packed checkpoint to ship).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-420}
RUNS=${RUNS:-out/runs}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$PWD/src}" PYTHONUNBUFFERED=1
[ -d out/demo-data ] || tar -xJf out/demo-data.tar.xz -C out || exit 1
nvidia-smi -L >"$OUT/gpu.txt" 2>&1
python3 recipes/demo/train_gpus.py --budget "$BUDGET" --out "$RUNS" \
    demo=recipes/demo.yaml demo-fp=recipes/demo-fp.yaml \
    demo-fp-lr1e-3=recipes/demo-fp.yaml,lr=1.0e-3 2>&1 | tee "$OUT/launch.log"
status=${PIPESTATUS[0]}
tar -czf "$OUT/logs.tar.gz" --exclude=checkpoints --exclude=final "$RUNS"
[ -d "$RUNS/demo/final/hf" ] && tar -czf "$OUT/demo-hf.tar.gz" -C "$RUNS/demo" final/hf
tail -n 3 "$RUNS"/*/train.log
exit "$status"
