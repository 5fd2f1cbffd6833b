"""Train the default model and its twins side by side on the local GPUs, sized to a wall-clock budget.

    python recipes/demo/train_gpus.py --budget 900 --out out/runs demo=recipes/demo.yaml \\
        demo-fp=recipes/demo-fp.yaml demo-fp-lr1e-3=recipes/demo-fp.yaml,lr=1.0e-3

Each NAME=RECIPE[,key=value...] is one `pybitnet train` run (values are YAML: 1.0e-3, not 1e-3); runs are
spread round-robin over the GPUs and all run at once (these models are far too small to fill an H200). A short
probe of every run first measures its step time with all runs sharing the GPUs; then each run's `max_steps` is
the largest multiple of 50 that fits the budget, the same for all of them so that they see the same batches
(same seed, same global batch), and the recipe each run used is written next to its results as
`<out>/<name>/recipe.yaml`. Runs still going GRACE_S after the budget are stopped, so a caller with a fixed
allocation can always collect the logs and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

PROBE_STEPS = 40
EVAL_EXPORT_S = 60  # evaluations (compiled once more in eval mode) and the export
SAFETY = 0.75  # of the measured step rate: checkpoints, evaluations and steadier clocks are not in the probe
GRACE_S = 60  # past the budget, runs still going are stopped


def launch(recipe: Path, flags: list[str], out_dir: Path, gpu: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    cmd = [sys.executable, "-m", "pybitnet.train", "--config", str(recipe), *flags, "--out-dir", str(out_dir)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], deadline: float | None = None) -> None:
    """Wait for every run; past `deadline` (a time.time() value) the rest are stopped, so that whatever they
    logged and checkpointed can still be collected within a fixed allocation."""
    failed = []
    for name, p in procs.items():
        try:
            timeout = None if deadline is None else max(deadline - time.time(), 0.0)
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            code = p.wait()
            print(f"{name}: stopped at the deadline", file=sys.stderr)
        if code != 0:
            failed.append(name)
    if failed:
        raise SystemExit(f"runs failed: {', '.join(failed)} (see their train.log)")


def step_seconds(metrics: Path) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "elapsed_s" in r]
    first, last = rows[len(rows) // 2], rows[-1]  # past compilation and warm-up of the allocator
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, required=True, help="wall seconds for the real runs")
    ap.add_argument("--out", type=Path, default=Path("out/runs"))
    ap.add_argument("runs", nargs="+", help="NAME=RECIPE[,key=value,...]")
    args = ap.parse_args()
    gpus = max(torch.cuda.device_count(), 1)
    runs = {}
    for i, spec in enumerate(args.runs):
        name, _, rest = spec.partition("=")
        recipe, *pairs = rest.split(",")
        if not name or not Path(recipe).is_file() or any("=" not in pair for pair in pairs):
            raise SystemExit(f"{spec!r}: expected NAME=RECIPE[,key=value...] with an existing recipe file")
        cfg = yaml.safe_load(Path(recipe).read_text())
        cfg.update({k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)})
        run_dir = args.out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        runs[name] = (run_dir, i % gpus, cfg)

    # probe: every run at once, so the step times include the sharing
    procs, started = {}, time.time()
    for name, (run_dir, gpu, cfg) in runs.items():
        probe_recipe = run_dir / "probe.yaml"
        # the real training data, so that its tokenization and sampling are measured too (startup_s below)
        probe = dict(cfg, max_steps=PROBE_STEPS, log_interval=5, save_interval=0, val_data=[])
        probe_recipe.write_text(yaml.safe_dump(probe, sort_keys=False))
        flags = ["--no-export", "--no-resume", "--loggers", "[jsonl]"]
        procs[name] = launch(probe_recipe, flags, run_dir / "probe", gpu, run_dir / "probe.log")
    wait_all(procs, deadline=started + args.budget)
    probe_wall = time.time() - started
    step_s = max(step_seconds(d / "probe" / "metrics.jsonl") for d, _, _ in runs.values())
    startup_s = probe_wall - PROBE_STEPS * step_s
    steps = int(SAFETY * (args.budget - startup_s - EVAL_EXPORT_S) / step_s) // 50 * 50
    print(json.dumps({"probe_wall_s": round(probe_wall, 1), "step_s": round(step_s, 4), "max_steps": steps}))
    if steps < 100:
        raise SystemExit("the budget fits fewer than 100 steps")

    procs, started = {}, time.time()
    for name, (run_dir, gpu, cfg) in runs.items():
        used = dict(cfg, max_steps=steps, out_dir=str(run_dir))
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
        procs[name] = launch(run_dir / "recipe.yaml", ["--no-resume"], run_dir, gpu, run_dir / "train.log")
    wait_all(procs, deadline=started + args.budget + GRACE_S)
    print(json.dumps({"train_wall_s": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
