"""Instruction counts of the one-row GEMV kernels as compiled for the H200 (sm_90), on a machine without a
GPU.

    python benchmarks/gpu_sass.py [--bn 32] [--bk 1024] [--warps 8] [--stages 1] [--gated] [--fused-norm]
                                  [--private-row] [--out DIR]
    python benchmarks/gpu_sass.py --step [--out DIR]

Triton compiles `_gemv_kernel` for compute capability 9.0 with the argument specializations a real launch
gets (pointers and N, K, KW, KXW divisible by 16), the `cuobjdump` that Triton's package carries
disassembles it, and the script prints registers, instructions in all, and instructions in the K loop (the
part that runs per weight tile) with its dp4a count. `--step`: the resident-program kernel
(`_gemv_resident_kernel`) of each projection of the 2B-4T decode step, in the tiles the engine uses
(`default_config`), with its block barriers, shared-memory accesses and warp shuffles — where a program's
time after its wait goes besides the loads (benchmarks/gpu_gemv_probe.py times that on the GPU). A tool for
choosing what to time on the GPU, not a timing.
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from pybitnet.kernels.triton.matmul import _gemv_kernel, _gemv_resident_kernel, default_config, resident_shape

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
POINTERS = {
    "x_ptr": "*i8", "g_ptr": "*bf16", "a_ptr": "*fp32", "q_ptr": "*i8", "w_ptr": "*u8", "s_ptr": "*fp32",
    "o_ptr": "*bf16", "r_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32", "g2_ptr": "*bf16",
    "q2_ptr": "*i8", "a2_ptr": "*fp32", "tcnt_ptr": "*i32", "probe_ptr": "*i64",
}  # fmt: skip
SCALARS = {"N": "i32", "K": "i32", "KW": "i32", "KXW": "i32", "eps": "fp32"}


def compile_gemv(constexprs: dict, warps: int, stages: int, out: Path, name: str, fn=_gemv_kernel,
                 pointers: dict | None = None) -> tuple[str, str]:  # fmt: skip
    """(SASS, resource usage) of the GEMV kernel `fn` for sm_90 with these compile-time arguments."""
    types = {**POINTERS, **(pointers or {}), **SCALARS, **{k: "constexpr" for k in constexprs}}
    names = list(fn.arg_names)
    signature = {k: types[k] for k in names}
    divisible = [k for k in names if k in POINTERS or k in ("N", "K", "KW", "KXW")]
    src = triton.compiler.ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in divisible},
    )
    kernel = triton.compile(
        src, target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False, "launch_pdl": True},
    )  # fmt: skip
    cubin = out / f"{name}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    (out / f"{name}.sass").write_text(sass)
    return sass, res


SMS = 132  # the H200's multiprocessors
# the one-row projections of a 2B-4T decode step: (N, K, gated), each with a bfloat16 row in and its norm
STEP = {"qkv": (3840, 2560, False), "o": (2560, 2560, False), "gate_up": (6912, 2560, True),
        "down": (2560, 6912, False)}  # fmt: skip


def _count(ops: collections.Counter, prefix: str) -> int:
    return sum(c for o, c in ops.items() if o.startswith(prefix))


def step_kernels(out: Path) -> None:
    """Registers, instructions, block barriers, shared-memory accesses, shuffles and dp4a of the resident
    GEMV of each projection of the decode step, in the engine's tiles."""
    for name, (n, k, gated) in STEP.items():
        cfg = default_config(1, n, k, gated=gated)
        if not cfg.resident:
            print(f"{name}: the engine's tile is not a resident-program one ({cfg})")
            continue
        residual = name in ("o", "down")
        _, shape = resident_shape(n, k, cfg, SMS)
        constexprs = dict(
            **shape, X_FLOAT=True, NORM=True, ACT=1 if gated else 0, RESIDUAL=residual,
            EARLY_RESIDUAL=residual, ROW_SCALE=name in ("qkv", "gate_up"), USE_ASM=True, NATIVE=True,
            PDL=True, PROBE=False,
        )  # fmt: skip
        sass, res = compile_gemv(constexprs, cfg.num_warps, cfg.num_stages, out, f"step_{name}",
                                 _gemv_resident_kernel, {"x_ptr": "*bf16"})  # fmt: skip
        ops = collections.Counter(opcode(t) for _, t in instructions(sass))
        regs = re.search(r"REG:(\d+)", res)
        count = functools.partial(_count, ops)
        print(
            f"{name}: {cfg.bn} rows x {cfg.num_warps} warps, {regs.group(1) if regs else '?'} registers, "
            f"{sum(ops.values())} instructions: {count('BAR.SYNC')} block barriers, {count('STS')} shared "
            f"stores, {count('LDS')} shared loads, {count('SHFL')} shuffles, {count('IDP.4A')} dp4a"
        )


def instructions(sass: str) -> list[tuple[int, str]]:
    found = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;", line)
        if m:
            found.append((int(m.group(1), 16), m.group(2)))
    return found


def loop_body(ins: list[tuple[int, str]]) -> list[str]:
    """The instructions between the target of the first backward branch and that branch (the K loop)."""
    for addr, text in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            return [t for a, t in ins if start <= a <= addr]
    return []


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bn", type=int, default=32)
    p.add_argument("--bk", type=int, default=1024)
    p.add_argument("--k", type=int, default=2560, help="K of the row (sets KB, the padded row length)")
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--gated", action="store_true", help="gate and up rows, relu²(gate) * up")
    p.add_argument("--fused-norm", action="store_true", help="float row in: RMSNorm + quantization inside")
    p.add_argument("--private-row", action="store_true")
    p.add_argument("--step", action="store_true", help="the decode step's resident GEMVs instead")
    p.add_argument("--out", default="gpu_sass", help="where the cubin and SASS files go")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        step_kernels(out)
        return
    kb = max(triton.next_power_of_2(args.k), 16)
    constexprs = dict(
        BN=args.bn, BK=args.bk, KB=kb, SPLIT_K=1, X_FLOAT=args.fused_norm, NORM=args.fused_norm,
        ACT=1 if args.gated else 0, RESIDUAL=False, ROW_SCALE=False, PRIVATE_ROW=args.private_row,
        THEN_QUANT=False, NORM2=False, NB=kb, USE_ASM=True, NATIVE=True, PDL=True,
    )  # fmt: skip
    sass, res = compile_gemv(constexprs, args.warps, args.stages, out, "gemv")
    ins = instructions(sass)
    body = loop_body(ins)
    regs = re.search(r"REG:(\d+)", res)
    ops = collections.Counter(opcode(t) for t in body)
    print(
        f"{regs.group(1) if regs else '?'} registers, {len(ins)} instructions, "
        f"{len(body)} in the K loop ({ops.get('IDP.4A.U8.S8', 0)} dp4a); loop: "
        + ", ".join(f"{o} {c}" for o, c in ops.most_common(8))
    )


if __name__ == "__main__":
    main()
