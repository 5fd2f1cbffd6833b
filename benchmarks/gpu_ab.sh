#!/usr/bin/env bash
# The batch-1 decode step of two or more source trees, alternated in separate processes (a tree's kernels and
# tiles are whatever its src holds), so that a change is timed against its parent in the same run:
#
#     mkdir .parent && git archive HEAD~1 src | tar -x -C .parent     # the parent's src, inside the tree
#     bash benchmarks/gpu_ab.sh .parent/src src [rounds=2]
#
# Each line: the tree, then the step at context 384 and ~110 / ~220 tokens further (gpu_decode_timeline.py
# --step-only). Run it from the repository root where pybitnet is not installed (PYTHONPATH must decide which
# tree is imported; an editable install would win over it).
set -u
trees=()
rounds=2
for arg in "$@"; do
  if [[ -d $arg ]]; then trees+=("$(cd "$arg" && pwd)"); else rounds=$arg; fi
done
if (( ${#trees[@]} < 2 )); then
  echo "usage: bash benchmarks/gpu_ab.sh SRC_A SRC_B [SRC ...] [rounds]" >&2
  exit 2
fi
for ((r = 1; r <= rounds; r++)); do
  for t in "${trees[@]}"; do
    line=$(cd benchmarks && PYTHONPATH=$t timeout 120 python3 gpu_decode_timeline.py --step-only 2>&1 | tr '\n' ' ')
    echo "round $r  $t  $line"
  done
done
