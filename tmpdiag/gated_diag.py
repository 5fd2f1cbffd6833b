import sys
from dataclasses import replace
import torch
sys.path.insert(0, "tests")
from pybitnet.kernels.triton import common
from pybitnet.kernels.triton.matmul import MMConfig, ternary_gemv, ternary_mm
from pybitnet.quant import quantize_activations  # noqa
from test_triton_kernels import _ternary, _packed

DEV = "cuda"
ASMS = (True, False, True)
for n, k, cfg in [(24, 200, MMConfig(bn=8, bk=128, gemv=True)), (24, 256, MMConfig(bn=8, bk=128, gemv=True)),
                  (48, 200, MMConfig(bn=16, bk=128, gemv=True)), (24, 200, MMConfig(bn=16, bk=256, gemv=True))]:
    for pdl in (True, False):
        common.PDL = pdl
        g = torch.Generator().manual_seed(n + k)
        tw = _ternary(n, k, g, per_row=True)
        pw = _packed(tw)
        x = torch.randn(1, k, generator=g)
        xq, a = quantize_activations(x)
        ref = ternary_mm(xq.to(DEV), a.to(DEV), pw, torch.bfloat16, act="relu2", backend="i2")
        outs = []
        for asm in ASMS:
            for c in (cfg, replace(cfg, words=True)):
                y = ternary_gemv(xq.to(DEV), pw, a=a[:, 0].to(DEV), act="relu2", config=c, use_asm=asm)
                torch.cuda.synchronize()
                outs.append(torch.equal(y, ref))
        print(n, k, cfg.bn, cfg.bk, "pdl", pdl, "equal to mm:", outs, flush=True)
        if not all(outs):
            print(" ref", ref.flatten()[:6].tolist(), "\n got", y.flatten()[:6].tolist())
