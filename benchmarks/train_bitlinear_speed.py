"""Training step time and peak memory of a 4-layer 2B-4T-shaped block stack on one GPU: nn.Linear (bf16
autocast) against BitLinear's torch straight-through path and the fused Triton kernels, eager and compiled;
then the loss curves of the reference and fused BitLinear on the same synthetic task.

    python benchmarks/train_bitlinear_speed.py [--batch 4] [--seq 2048] [--layers 4] [--steps 20]

Step = forward + backward + fused AdamW step, bf16 autocast over float32 master weights.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from pybitnet.models.presets import preset
from pybitnet.models.transformer import Block, rope_inv_freq
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
        for block in self.layers:
            x = block(x, cos, sin, pos, None)
        return x


def build(kind: str, layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        model = Stack(layers, lambda i, o: nn.Linear(i, o, bias=False))
    else:
        model = Stack(layers, lambda i, o: BitLinear(i, o))
        if kind == "fused":
            use_fused_kernels(model)
            set_fused(model, True)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    return model.cuda()


def time_steps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (fwd(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    return ms, torch.cuda.max_memory_allocated() / 2**30


def profile_step(model: nn.Module, x, target) -> str:
    """The top CUDA kernels of one compiled training step."""
    from torch.profiler import ProfilerActivity, profile

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (fwd(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)


def loss_curve(kind: str, layers: int, x, target, steps: int) -> list[float]:
    model = build(kind, layers, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    fwd = torch.compile(model)
    out = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (fwd(x).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.detach())
    return [v.item() for v in out]


def check_fused_on_gpu() -> dict:
    """The int8 GEMM and the fused layer against the torch path on this GPU."""
    from pybitnet.kernels.reference import ternary_matmul_int
    from pybitnet.train.fused import fused_bitlinear, int8_matmul

    torch.manual_seed(0)
    xq = torch.randint(-128, 128, (509, 2560), dtype=torch.int8, device="cuda")
    codes = torch.randint(-1, 2, (6912, 2560), dtype=torch.int8, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = torch.equal(int8_matmul(xq, codes, torch.ones(509, device="cuda"), torch.float32),
                        ternary_matmul_int(xq, codes).float())  # fmt: skip
    layer = BitLinear(2560, 6912).cuda()
    x = torch.randn(4, 509, 2560, device="cuda", requires_grad=True)
    y_ref = layer(x)
    y_ref.square().sum().backward()
    gx, gw = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    y = fused_bitlinear(x, layer.weight)
    y.square().sum().backward()
    torch.backends.cuda.matmul.allow_tf32 = True

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {
        "gemm_exact": exact,
        "y_rel": rel(y, y_ref),
        "gx_rel": rel(x.grad, gx),
        "gw_rel": rel(layer.weight.grad, gw),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--kinds", default="linear,reference,fused")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(json.dumps({"fused_check": check_fused_on_gpu()}), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(args.batch, args.seq, 2560, device="cuda", generator=g)
    target = torch.randn(args.batch, args.seq, 2560, device="cuda", generator=g) * 0.5
    results = {}
    for kind in args.kinds.split(","):
        for mode in args.modes.split(","):
            model = build(kind, args.layers)
            ms, gib = time_steps(model, x, target, args.steps, mode == "compiled")
            results[f"{kind}/{mode}"] = {"ms": round(ms, 2), "peak_gib": round(gib, 2)}
            print(json.dumps({f"{kind}/{mode}": results[f"{kind}/{mode}"]}), flush=True)
            del model
            torch.cuda.empty_cache()
    base = results.get("linear/compiled")
    if base:
        for r in results.values():
            r["vs_linear_compiled"] = round(r["ms"] / base["ms"], 3)
            r["mem_vs_linear_compiled"] = round(r["peak_gib"] / base["peak_gib"], 3)
    if args.curve_steps:
        small_x, small_t = x[:1, :512], target[:1, :512]
        ref = loss_curve("reference", args.layers, small_x, small_t, args.curve_steps)
        fus = loss_curve("fused", args.layers, small_x, small_t, args.curve_steps)
        # noise floor: the reference path again on a 1e-3 perturbation of the input
        noisy = loss_curve("reference", args.layers, small_x * 1.001, small_t, args.curve_steps)

        def max_rel(a, b):
            return round(max(abs(u - v) / abs(u) for u, v in zip(a, b, strict=True)), 5)

        results["curve"] = {
            "reference_first_last": [round(ref[0], 5), round(ref[-1], 5)],
            "fused_first_last": [round(fus[0], 5), round(fus[-1], 5)],
            "perturbed_reference_first_last": [round(noisy[0], 5), round(noisy[-1], 5)],
            "fused_vs_reference_max_rel": max_rel(ref, fus),
            "perturbed_vs_reference_max_rel": max_rel(ref, noisy),
        }
    if args.profile:
        for kind in ("reference", "fused"):
            model = build(kind, args.layers)
            print(kind, profile_step(model, x, target), flush=True)
            del model
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args)}))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
