#!/usr/bin/env bash
# DDP over NCCL: 2 processes on 2 GPUs give the losses of 1 process at the same global batch.
#
#     bash benchmarks/train_ddp_nccl.sh [steps]
#
# A tiny 2-layer ternary model on the dummy corpus, through the real trainer (`python -m pybitnet.train`, the
# int8 BitLinear kernels on, as on any CUDA run): once in one process (micro-batch 2 x 2 accumulation steps),
# once under torchrun with 2 processes (micro-batch 2 each), in fp32 and in bf16 autocast. Prints each step's
# losses and the largest relative difference, and fails above the tolerance: fp32 5e-3 (the runs sum
# gradients in different orders; a 1-ulp change can flip a ternary code), bf16 2e-2 (bf16 GEMMs on top).
# With fewer than 2 GPUs it prints why and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
STEPS=${1:-8}

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "train_ddp_nccl: skipped, needs 2 CUDA GPUs (found $gpus)"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" - "$work" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path

from pybitnet.models.dummy import TRAINING_TEXT, tokenizer_for, write_tokenizer_files
from pybitnet.models.presets import preset

work, steps = Path(sys.argv[1]), int(sys.argv[2])
config = preset("tiny-bitnet")
(work / "tok").mkdir()
write_tokenizer_files(tokenizer_for(config), config, work / "tok")
(work / "corpus.txt").write_text(TRAINING_TEXT)
base = {
    "preset": "tiny-bitnet",
    "model_overrides": {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                        "num_key_value_heads": 2},
    "tokenizer": str(work / "tok"), "train_data": [str(work / "corpus.txt")],
    "seq_len": 64, "max_steps": steps, "lr": 3e-3, "loggers": ["jsonl"], "log_interval": 1, "export": False,
}
for precision in ("fp32", "bf16"):
    for name, extra in (("single", {"micro_batch_size": 2, "grad_accum_steps": 2}),
                        ("ddp", {"micro_batch_size": 2, "grad_accum_steps": 1})):
        recipe = {**base, **extra, "precision": precision, "out_dir": str(work / f"{name}_{precision}")}
        (work / f"{name}_{precision}.yaml").write_text(json.dumps(recipe))  # JSON is YAML
EOF

for precision in fp32 bf16; do
    "$PY" -m pybitnet.train --config "$work/single_$precision.yaml" > "$work/single_$precision.log" 2>&1 \
        || { cat "$work/single_$precision.log"; exit 1; }
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m pybitnet.train \
        --config "$work/ddp_$precision.yaml" > "$work/ddp_$precision.log" 2>&1 \
        || { cat "$work/ddp_$precision.log"; exit 1; }
done

"$PY" - "$work" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
TOLERANCE = {"fp32": 5e-3, "bf16": 2e-2}


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


failed = False
for precision, tol in TOLERANCE.items():
    one, two = losses(work / f"single_{precision}"), losses(work / f"ddp_{precision}")
    if sorted(one) != sorted(two) or not one:
        print(f"{precision}: steps differ: 1 process {sorted(one)}, 2 processes {sorted(two)}")
        failed = True
        continue
    rel = {s: abs(two[s] - one[s]) / abs(one[s]) for s in one}
    for s in sorted(one):
        print(f"{precision} step {s}: 1 process {one[s]:.6f}  2 processes {two[s]:.6f}  rel {rel[s]:.2e}")
    worst = max(rel.values())
    ok = worst <= tol
    failed |= not ok
    print(json.dumps({"precision": precision, "max_abs_diff": max(abs(two[s] - one[s]) for s in one),
                      "max_rel_diff": worst, "tolerance": tol, "ok": ok}))
sys.exit(1 if failed else 0)
EOF
