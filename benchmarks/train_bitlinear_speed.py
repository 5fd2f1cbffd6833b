"""Training step time and peak memory of a 4-layer 2B-4T-shaped block stack on one GPU: nn.Linear (bf16
autocast) against BitLinear's torch straight-through path and its int8 variants, eager and compiled; then the
loss curves of the reference and each int8 variant on the same synthetic task.

    python benchmarks/train_bitlinear_speed.py [--kinds linear,reference,int8,int8-gx8]
        [--modes eager,compiled] [--batch 4] [--seq 2048] [--layers 4] [--steps 20] [--curve-steps 200]
        [--checkpointing none|mlp|block] [--memory-budgets 1,0.5] [--memory] [--profile] [--out results.json]

`--memory` lists what is allocated at each kind's peak (size, count, the code that allocated it).

Kinds (the linear layers of every block):
- linear: nn.Linear, bf16 autocast (the peer every ratio is against, compiled).
- reference: BitLinear, fake quantization with straight-through estimators in torch.
- int8 (alias fused): `pybitnet.train.fused`, int8 GEMM forward, float backward (grad_x_mode "bf16").
- int8-gx8: the same with grad_x on the int8 GEMM too (grad_x_mode "int8": output gradient rounded to int8).

Step = forward + backward + fused AdamW step, bf16 autocast over float32 master weights.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._functorch.config
from torch import nn

from pybitnet.models.presets import preset
from pybitnet.models.transformer import Block, rope_inv_freq, set_activation_checkpointing
from pybitnet.nn import BitLinear
from pybitnet.train.fused import set_fused, use_fused_kernels


class Stack(nn.Module):
    def __init__(self, layers: int, linear) -> None:
        super().__init__()
        self.config = preset("bitnet-2b-4t", num_hidden_layers=layers)
        self.layers = nn.ModuleList(Block(self.config, i, linear) for i in range(layers))
        self.register_buffer("inv_freq", rope_inv_freq(self.config), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device).expand(b, -1)
        freqs = pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for block in self.layers:  # positions None: plain causal attention, as Transformer runs training
            x = block(x, cos, sin, None, None)
        return x


# kind -> grad_x_mode of the int8 path (None: not the int8 path)
INT8_KINDS = {"int8": "bf16", "fused": "bf16", "int8-gx8": "int8"}
KINDS = ("linear", "reference", *INT8_KINDS)


def build(kind: str, layers: int, seed: int = 0, checkpointing: str = "none") -> nn.Module:
    """The stack of `kind`; `checkpointing` (activation checkpointing) applies to the BitLinear kinds, the
    nn.Linear baseline keeps every activation."""
    torch.manual_seed(seed)
    if kind == "linear":
        model = Stack(layers, lambda i, o: nn.Linear(i, o, bias=False))
    else:
        model = Stack(layers, lambda i, o: BitLinear(i, o))
        set_activation_checkpointing(model, checkpointing)
        if kind in INT8_KINDS:
            if use_fused_kernels(model, INT8_KINDS[kind]) == 0:
                raise SystemExit("the int8 kinds need Triton")
            set_fused(model, True)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    return model.cuda()


def make_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, compiled: bool, lr: float = 1e-4):
    """One training step (forward, backward, fused AdamW), returning the loss on the device (no sync)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    fwd = torch.compile(model) if compiled else model

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (fwd(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.forward = fwd  # type: ignore[attr-defined]
    return step


def time_steps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, compiled: bool):
    step = make_step(model, x, target, compiled)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = step.forward(x)
    saved = (torch.cuda.memory_allocated() - base - y.numel() * y.element_size()) / 2**30
    y.float().sum().backward()
    return ms, peak, saved


def profile_step(model: nn.Module, x, target) -> str:
    """The top CUDA kernels of one compiled training step."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(model, x, target, compiled=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)


def memory_at_peak(model: nn.Module, x, target, top: int = 16) -> dict:
    """What is allocated at the peak of one compiled step, above what the step starts with: the live
    allocations grouped by size and the code that made them (the first frames outside torch's own files)."""
    step = make_step(model, x, target, compiled=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in trace if e["action"] in ("alloc", "free_requested")]
    now = peak = peak_at = 0
    for i, e in enumerate(events):
        now += e["size"] if e["action"] == "alloc" else -e["size"]
        if now > peak:
            peak, peak_at = now, i
    live: dict[int, dict] = {}
    for e in events[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)

    def where(e: dict) -> str:
        frames = e.get("frames", [])
        ours = [f for f in frames if "/torch/" not in f["filename"] or "torchinductor" in f["filename"]]
        return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in ours[:2])

    groups: dict[tuple[int, str], int] = {}
    for e in live.values():
        key = (e["size"], where(e))
        groups[key] = groups.get(key, 0) + 1
    rows = sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[1])
    return {
        "peak_above_start_gib": round(peak / 2**30, 3),
        "live_at_peak": [
            {"mib": round(size * n / 2**20, 1), "count": n, "each_mib": round(size / 2**20, 2), "where": w}
            for (size, w), n in rows[:top]
        ],
    }


def loss_curve(kind: str, layers: int, x, target, steps: int) -> list[float]:
    step = make_step(build(kind, layers, seed=1), x, target, compiled=True, lr=1e-3)
    return [v.item() for v in [step() for _ in range(steps)]]  # one sync, at the end


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_fused_on_gpu(int8_kinds: list[str]) -> dict:
    """The int8 GEMM (integer-exact against the reference kernel) and each int8 layer against the torch path
    on this GPU, in float32 (relative errors of the output and both gradients)."""
    from pybitnet.kernels.reference import ternary_matmul_int
    from pybitnet.train.fused import fused_bitlinear, int8_matmul

    torch.manual_seed(0)
    xq = torch.randint(-128, 128, (509, 2560), dtype=torch.int8, device="cuda")
    codes = torch.randint(-1, 2, (6912, 2560), dtype=torch.int8, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ones = torch.ones(509, device="cuda"), torch.ones(1, device="cuda")
    out = {"gemm_exact": torch.equal(int8_matmul(xq, codes, *ones, torch.float32),
                                     ternary_matmul_int(xq, codes).float())}  # fmt: skip
    layer = BitLinear(2560, 6912).cuda()
    x = torch.randn(4, 509, 2560, device="cuda", requires_grad=True)
    y_ref = layer(x)
    y_ref.square().sum().backward()
    gx, gw = x.grad.clone(), layer.weight.grad.clone()
    for kind in int8_kinds:
        x.grad = layer.weight.grad = None
        y = fused_bitlinear(x, layer.weight, grad_x_mode=INT8_KINDS[kind])
        y.square().sum().backward()
        out[kind] = {"y_rel": rel(y, y_ref), "gx_rel": rel(x.grad, gx), "gw_rel": rel(layer.weight.grad, gw)}
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


def curve_summary(curves: dict[str, list[float]]) -> dict:
    """First/last loss of each curve, and each curve's largest per-step relative gap to the reference; the
    reference run on a 0.1 % perturbed input is the noise floor to compare those gaps with."""

    def max_rel(a, b):
        return round(max(abs(u - v) / abs(u) for u, v in zip(a, b, strict=True)), 5)

    def mean_last(c, n=20):
        return round(sum(c[-n:]) / len(c[-n:]), 5)

    ref = curves["reference"]
    return {
        name: {
            "first": round(c[0], 5),
            "last": round(c[-1], 5),
            "mean_last_20": mean_last(c),
            "max_rel_gap_to_reference": max_rel(ref, c),
        }
        for name, c in curves.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--kinds", default="linear,reference,int8,int8-gx8")
    ap.add_argument("--modes", default="compiled", help="eager, compiled or both (comma-separated)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of each kind's step")
    ap.add_argument(
        "--memory", action="store_true", help="list what is allocated at each kind's peak (by size and code)"
    )
    ap.add_argument("--out", help="also write the results as JSON to this path")
    ap.add_argument(
        "--checkpointing",
        default="none",
        help="activation checkpointing of the BitLinear kinds: none, mlp or block (nn.Linear keeps all)",
    )
    ap.add_argument(
        "--memory-budgets",
        default="1",
        help="torch.compile's activation memory budgets for the BitLinear kinds, e.g. 1,0.5: each a row "
        "(1: keep what the partitioner keeps by default; below 1 it recomputes cheap ops to stay under that "
        "share of the saved activations); nn.Linear keeps 1",
    )
    ap.add_argument(
        "--bf16-grads",
        action="store_true",
        help="int8 kinds: gradients rounded to bf16, then cast, as the reference (not float32 GEMM output)",
    )
    args = ap.parse_args()
    if args.bf16_grads:
        import pybitnet.train.fused as fused_module

        fused_module.FLOAT32_GRADIENTS = False
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; known: {', '.join(KINDS)}")
    int8_kinds = [k for k in kinds if k in INT8_KINDS]
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    if int8_kinds:
        results["fused_check"] = check_fused_on_gpu(int8_kinds)
        print(json.dumps({"fused_check": results["fused_check"]}), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.batch, args.seq, 2560, device="cuda", generator=g)
    target = torch.randn(args.batch, args.seq, 2560, device="cuda", generator=g) * 0.5
    steps = {}
    budgets = [float(b) for b in args.memory_budgets.split(",")]
    for kind in kinds:
        for mode in args.modes.split(","):
            for budget in budgets if kind != "linear" else [1.0]:
                torch._functorch.config.activation_memory_budget = budget
                name = f"{kind}/{mode}" + (f"@{budget:g}" if budget != 1 else "")
                t0 = time.perf_counter()
                model = build(kind, args.layers, checkpointing=args.checkpointing)
                ms, gib, saved = time_steps(model, x, target, args.steps, mode == "compiled")
                # saved_gib: what the forward keeps for the backward (allocated after it, less its output)
                steps[name] = {"ms": round(ms, 2), "peak_gib": round(gib, 3), "saved_gib": round(saved, 3)}
                wall = round(time.perf_counter() - t0, 1)
                print(json.dumps({name: steps[name], "wall_s": wall}), flush=True)
                del model
                torch.cuda.empty_cache()
    torch._functorch.config.activation_memory_budget = 1.0
    for peer in ("linear/compiled", "reference/compiled"):
        if peer in steps:
            for r in steps.values():
                r[f"time_vs_{peer}"] = round(r["ms"] / steps[peer]["ms"], 3)
                r[f"mem_vs_{peer}"] = round(r["peak_gib"] / steps[peer]["peak_gib"], 3)
    results["steps"] = steps
    if args.curve_steps:
        small_x, small_t = x[:1, :512], target[:1, :512]
        curves = {k: loss_curve(k, args.layers, small_x, small_t, args.curve_steps)
                  for k in ("reference", *int8_kinds)}  # fmt: skip
        curves["reference, input * 1.001"] = loss_curve(
            "reference", args.layers, small_x * 1.001, small_t, args.curve_steps
        )
        results["curve"] = curve_summary(curves)
    if args.profile:
        for kind in kinds:
            model = build(kind, args.layers)
            print(kind, profile_step(model, x, target), flush=True)
            del model
    if args.memory:
        for kind in kinds:
            model = build(kind, args.layers, checkpointing=args.checkpointing)
            results.setdefault("memory", {})[kind] = memory_at_peak(model, x, target)
            print(kind, json.dumps(results["memory"][kind], indent=1), flush=True)
            del model
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    print_table(steps)


def print_table(steps: dict) -> None:
    peer = "linear/compiled"
    print(f"{'kind/mode':<24}{'ms':>9}{'GiB':>8}{'time/' + peer:>24}{'mem/' + peer:>23}")
    for name, r in steps.items():
        t, m = r.get("time_vs_" + peer, float("nan")), r.get("mem_vs_" + peer, float("nan"))
        print(f"{name:<24}{r['ms']:>9.2f}{r['peak_gib']:>8.3f}{t:>24.3f}{m:>23.3f}")


if __name__ == "__main__":
    main()
