"""Peak resident memory of loading a model on CPU and running one forward, against its checkpoint bytes.

Creates the `bitnet-2b-4t` dummy (random ternary weights, bf16 embeddings) in a temporary directory unless
--model-dir names an existing checkpoint, then loads it in a fresh Python process (so nothing of the creation
counts) and reports that process's peak RSS (VmHWM). Target: peak RSS <= 1.3x the checkpoint bytes, which
needs the packed weights to stay memory-mapped (no float copy of them).

    python benchmarks/load_rss.py [--preset bitnet-2b-4t] [--model-dir DIR] [--kernel reference] [--tokens 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.3


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def child(model_dir: str, kernel: str | None, tokens: int) -> None:
    """Runs in the fresh process: load, one forward, print the memory figures as JSON."""
    import resource

    import torch

    import pybitnet

    after_import = _status_kib("VmRSS")
    t0 = time.perf_counter()
    model = pybitnet.load_model(model_dir, device="cpu", dtype=torch.bfloat16, kernel=kernel)
    load_s = time.perf_counter() - t0
    after_load = _status_kib("VmRSS")
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids)
    forward_s = time.perf_counter() - t0
    assert torch.isfinite(logits).all(), "the forward produced non-finite logits"
    kernels = sorted({m.kernel.name for m in model.modules() if hasattr(m, "kernel")})
    print(
        json.dumps(
            {
                "rss_after_import_kib": after_import,
                "rss_after_load_kib": after_load,
                "vm_hwm_kib": _status_kib("VmHWM"),
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_anon_kib": _status_kib("RssAnon"),
                "rss_file_kib": _status_kib("RssFile"),
                "load_s": load_s,
                "forward_s": forward_s,
                "kernels": kernels,
            }
        )
    )


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def measure(model_dir: Path, kernel: str | None, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--tokens", str(tokens)]
    if kernel:
        cmd += ["--kernel", kernel]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["checkpoint_bytes"] = checkpoint_bytes(model_dir)
    result["peak_ratio"] = result["vm_hwm_kib"] * 1024 / result["checkpoint_bytes"]
    result["peak_over_import_ratio"] = (
        (result["vm_hwm_kib"] - result["rss_after_import_kib"]) * 1024 / result["checkpoint_bytes"]
    )
    return result


def report(preset: str, result: dict) -> str:
    mib = 1024
    lines = [
        f"model: {preset} dummy, checkpoint {result['checkpoint_bytes'] / 2**20:.0f} MiB (safetensors)",
        f"kernels: {', '.join(result['kernels'])}; "
        f"load {result['load_s']:.2f} s, forward {result['forward_s']:.2f} s",
        f"RSS after `import torch, pybitnet`: {result['rss_after_import_kib'] / mib:.0f} MiB",
        f"RSS after load: {result['rss_after_load_kib'] / mib:.0f} MiB",
        f"peak RSS (VmHWM): {result['vm_hwm_kib'] / mib:.0f} MiB "
        f"(anon {result['rss_anon_kib'] / mib:.0f} MiB, "
        f"file-backed {result['rss_file_kib'] / mib:.0f} MiB at exit)",
        f"peak RSS / checkpoint bytes: {result['peak_ratio']:.3f} (target <= {TARGET_RATIO}); "
        f"without the interpreter + torch baseline: {result['peak_over_import_ratio']:.3f}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bitnet-2b-4t")
    ap.add_argument("--model-dir", type=Path, help="an existing checkpoint to measure instead of a new dummy")
    ap.add_argument("--kernel", help="kernel name (default: pybitnet's automatic choice)")
    ap.add_argument("--tokens", type=int, default=8, help="prompt length of the forward")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.kernel, args.tokens)
        return
    with tempfile.TemporaryDirectory(prefix="pybitnet-rss-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            import torch

            from pybitnet.models.dummy import create_dummy

            model_dir = create_dummy(args.preset, Path(tmp) / args.preset, dtype=torch.bfloat16)
        result = measure(model_dir, args.kernel, args.tokens)
    print(f"python {platform.python_version()}, {platform.machine()}")
    print(report(args.preset, result))
    if args.json:
        print(json.dumps(result))
    if result["peak_ratio"] > TARGET_RATIO:
        sys.exit(1)


if __name__ == "__main__":
    main()
