"""Triton kernels against the reference kernel: integer-exact products, value-exact quantization and
epilogues. Without CUDA they run in Triton's CPU interpreter (TRITON_INTERPRET=1), on small shapes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # before triton is imported (tests/conftest.py does it too)
pytest.importorskip("triton")

from pybitnet.kernels import get_kernel, select_kernel
from pybitnet.kernels.reference import reference_linear, scale_output, ternary_matmul_int
from pybitnet.kernels.triton import attention
from pybitnet.kernels.triton.argmax import argmax_rows, greedy_advance
from pybitnet.kernels.triton.attention import decode_attention
from pybitnet.kernels.triton.common import ROUND, scratch_buffer
from pybitnet.kernels.triton.embedding import embedding
from pybitnet.kernels.triton.expanded import expand_codes, int8_codes
from pybitnet.kernels.triton.matmul import MMConfig, int8_weight, ternary_gemv, ternary_mm
from pybitnet.kernels.triton.quant import norm_quant
from pybitnet.models.transformer import apply_rope
from pybitnet.nn import RMSNorm
from pybitnet.quant import TernaryWeight, pack, quantize_activations, repack
from pybitnet.quant.layouts.triton_i2 import pack_i2, unpack_i2

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _ternary(n: int, k: int, g: torch.Generator, per_row: bool = False) -> TernaryWeight:
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n if per_row else (), generator=g) * 0.1 + 0.01
    return TernaryWeight(codes, scale)


def _packed(tw: TernaryWeight):
    pw = pack(tw, "triton_i2")
    return type(pw)(pw.layout, pw.data.to(DEV), pw.scale.to(DEV), pw.shape)


def _ref(x: torch.Tensor, tw: TernaryWeight, dtype: torch.dtype) -> torch.Tensor:
    """Reference product on the CPU from float activations: quantize, exact int accumulation, scale."""
    xq, a = quantize_activations(x.cpu())
    return scale_output(ternary_matmul_int(xq, tw.codes), tw.scale, a, dtype)


def _norm(k: int, dtype: torch.dtype, g: torch.Generator) -> RMSNorm:
    norm = RMSNorm(k, 1e-5).to(dtype)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(k, generator=g))
    return norm


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 128), (33, 300), (8, 1000)])
def test_layout_round_trip_and_byte_order(shape):
    g = torch.Generator().manual_seed(0)
    tw = _ternary(*shape, g)
    data = pack_i2(tw.codes)
    assert torch.equal(unpack_i2(data, shape[1]), tw.codes)
    n, k = shape
    for row, col in [(0, 0), (n - 1, k - 1), (n // 2, k // 3)]:
        byte = data[row, (col // 128) * 32 + col % 32]
        shift = 6 - 2 * ((col % 128) // 32)
        assert (int(byte) >> shift) & 3 == int(tw.codes[row, col]) + 1
    hf = pack(tw, "hf")
    assert torch.equal(repack(hf, "triton_i2").data, data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 200, 1000])
def test_norm_quant_matches_rmsnorm_then_quantize(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(6, k, generator=g) * 3).to(dtype)
    xq, a, _ = norm_quant(x.to(DEV))  # quantization alone: exact
    ref_q, ref_a = quantize_activations(x)
    assert torch.equal(xq.cpu(), ref_q) and torch.equal(a.cpu(), ref_a[:, 0])
    # with RMSNorm: the sum of squares is added up in another order than torch's, so the normalized row may
    # differ in its last bit, and a quantized value by one step, rarely
    norm = _norm(k, dtype, g)
    xq, a, y = norm_quant(x.to(DEV), norm.weight.to(DEV), 1e-5, store_float=True)
    ref_y = norm(x)
    ref_q, ref_a = quantize_activations(ref_y)
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(y.cpu().float(), ref_y.float(), rtol=2 * ulp, atol=0)
    diff = (xq.cpu().int() - ref_q.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
    assert torch.allclose(a.cpu(), ref_a[:, 0], rtol=4 * ulp)


MM_CASES = [  # (M, N, K, config)
    (3, 40, 300, MMConfig(bm=16, bn=16, bk=128)),
    (17, 33, 129, MMConfig(bm=16, bn=32, bk=256, split_k=2)),
    (1, 48, 256, MMConfig(bm=16, bn=16, bk=128, split_k=3)),
    (70, 24, 520, MMConfig(bm=64, bn=16, bk=256)),
    (21, 70, 300, MMConfig(bm=16, bn=64, bk=128, swap=True)),
    (40, 33, 260, MMConfig(bm=32, bn=64, bk=256, split_k=2, swap=True)),
    # ten row tiles: a full band of the grouped tile order and a partial one, with split K
    (150, 40, 130, MMConfig(bm=16, bn=16, bk=128, split_k=2)),
    # fewer weight bytes in a tile than the program has threads x 4 (the decode's inline assembly takes four)
    (5, 24, 200, MMConfig(bm=16, bn=16, bk=128, num_warps=8)),
    (9, 8, 136, MMConfig(bm=16, bn=16, bk=128, num_warps=4, swap=True)),
]


@pytest.mark.parametrize("m,n,k,cfg", MM_CASES)
@pytest.mark.parametrize("per_row", [False, True])
def test_mm_is_integer_exact(m, n, k, cfg, per_row):
    g = torch.Generator().manual_seed(m * n + k)
    tw = _ternary(n, k, g, per_row)
    x = torch.randn(m, k, generator=g)
    xq, a = quantize_activations(x)
    y = ternary_mm(xq.to(DEV), a[:, 0].to(DEV), _packed(tw), torch.float32, config=cfg)
    assert torch.equal(y.cpu(), _ref(x, tw, torch.float32))
    if cfg is not None and cfg.split_k > 1:  # the arrival counters are back at zero for the next launch
        assert torch.equal(ternary_mm(xq.to(DEV), a[:, 0].to(DEV), _packed(tw), torch.float32, config=cfg), y)


@pytest.mark.parametrize("n,k", [(40, 264), (24, 300)])
def test_expand_codes_matches_unpack(n, k):
    tw = _ternary(n, k, torch.Generator().manual_seed(n))
    assert torch.equal(expand_codes(_packed(tw)).cpu(), tw.codes)
    # paired (a gate / up weight): gate row r at 2r, up row r at 2r + 1
    gate, up = tw.codes.chunk(2)
    assert torch.equal(expand_codes(_packed(tw), paired=True).cpu(), torch.stack([gate, up], 1).view(n, k))


@pytest.mark.parametrize("backend", ["int_mm", "w8"])
@pytest.mark.parametrize("m,n,k", [(37, 40, 264), (20, 24, 300)])  # K = 300: int_mm falls back to w8
@pytest.mark.parametrize("epilogue", ["plain", "gated", "residual"])
def test_expanded_backends_are_exact(backend, m, n, k, epilogue):
    """The large-M paths (codes expanded to int8, then cuBLASLt int8 + epilogue kernel, or int8 tl.dot) give
    what the 2-bit tensor-core kernel gives, value for value, with each epilogue."""
    g = torch.Generator().manual_seed(m + n + k)
    act = "relu2" if epilogue == "gated" else None
    tw = _ternary(2 * n if act else n, k, g, per_row=True)
    xq, a = quantize_activations(torch.randn(m, k, generator=g))
    xq, a = xq.to(DEV), a[:, 0].to(DEV)
    resid = torch.randn(m, n, generator=g).to(DEV) if epilogue == "residual" else None
    kw = {"residual": resid, "act": act}
    ref = ternary_mm(xq, a, _packed(tw), torch.float32, backend="i2", **kw)
    if epilogue == "plain":
        exact = scale_output(
            ternary_matmul_int(xq.cpu(), tw.codes), tw.scale, a.cpu()[:, None], torch.float32
        )
        assert torch.equal(ref.cpu(), exact)
    assert torch.equal(ternary_mm(xq, a, _packed(tw), torch.float32, backend=backend, **kw), ref)
    if backend == "w8":  # the codes kept as int8 by the caller: the same product without an expansion
        codes = int8_codes(_packed(tw), gated=act is not None)
        assert torch.equal(ternary_mm(xq, a, _packed(tw), torch.float32, codes=codes, **kw), ref)
        with pytest.raises(ValueError, match="int8_codes"):
            ternary_mm(xq, a, _packed(tw), torch.float32, codes=codes[1:], **kw)
    if backend == "w8":  # several row and column tiles (a gated tile of 16 weight rows: 8 outputs)
        cfg = MMConfig(bm=16, bn=16, bk=128)
        assert torch.equal(
            ternary_mm(xq, a, _packed(tw), torch.float32, backend=backend, config=cfg, **kw), ref
        )


GEMV_CASES = [  # 32-bit word tiles; K not whole words or 128-blocks (partial last words and blocks), split K,
    # private rows, a tile of fewer elements than the program has threads
    (48, 200, MMConfig(bn=16, bk=128, gemv=True)),
    (40, 300, MMConfig(bn=8, bk=256, split_k=2, gemv=True, private_row=True)),
    (130, 1000, MMConfig(bn=32, bk=512, split_k=3, gemv=True)),
    (48, 256, MMConfig(bn=16, bk=128, gemv=True)),
    (40, 1007, MMConfig(bn=8, bk=256, split_k=2, gemv=True, private_row=True)),
    (70, 2560, MMConfig(bn=32, bk=1024, split_k=3, gemv=True)),
    (24, 202, MMConfig(bn=8, bk=128, gemv=True)),
    (6, 3, MMConfig(bn=8, bk=128, gemv=True)),
    # resident programs, each over several tiles and all of K (more tiles than programs in the interpreter)
    (48, 200, MMConfig(bn=8, gemv=True, resident=1)),
    (130, 1000, MMConfig(bn=16, gemv=True, resident=2)),
    (70, 2560, MMConfig(bn=8, gemv=True, resident=1)),
    (6, 3, MMConfig(bn=8, gemv=True, resident=1)),
    (40, 700, MMConfig(bn=16, gemv=True, resident=2)),  # a row of 48 code words: pieces of 32 and 16
    (24, 700, MMConfig(bn=8, gemv=True, resident=2)),  # as many programs as tiles: no next tile requested
]


@pytest.mark.parametrize("n,k,cfg", GEMV_CASES)
@pytest.mark.parametrize("use_asm", [False, True] if DEV == "cuda" else [False])
def test_gemv_is_integer_exact(n, k, cfg, use_asm):
    g = torch.Generator().manual_seed(n + k)
    tw = _ternary(n, k, g, per_row=n % 2 == 0)
    pw = _packed(tw)
    x = torch.randn(1, k, generator=g)
    ref = _ref(x, tw, torch.float32)
    xq, a = quantize_activations(x)
    y = ternary_gemv(xq.to(DEV), pw, a=a[:, 0].to(DEV), out_dtype=torch.float32, config=cfg, use_asm=use_asm)
    assert torch.equal(y.cpu(), ref)
    y = ternary_gemv(x.to(DEV), pw, config=cfg, use_asm=use_asm)  # quantized inside the kernel
    assert torch.equal(y.cpu(), ref)
    odd = torch.zeros(1, k + 1, dtype=torch.int8, device=DEV)  # a row not 4-byte aligned: read from a copy
    odd[:, 1:] = xq.to(DEV)
    y = ternary_gemv(odd[:, 1:], pw, a=a[:, 0].to(DEV), out_dtype=torch.float32, config=cfg, use_asm=use_asm)
    assert torch.equal(y.cpu(), ref)
    with pytest.raises(ValueError, match="multiple of 128"):
        ternary_gemv(xq.to(DEV), pw, a=a[:, 0].to(DEV), config=MMConfig(bn=8, bk=64, gemv=True))
    if n % 2 == 0:  # gated (gate rows, then up rows): what the tensor-core kernel gives
        want = ternary_mm(xq.to(DEV), a.to(DEV), pw, act="relu2", backend="i2")
        got = ternary_gemv(xq.to(DEV), pw, a=a[:, 0].to(DEV), act="relu2", config=cfg, use_asm=use_asm)
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["relu2", "silu"])
@pytest.mark.parametrize("m", [1, 5])
def test_gated_and_residual_epilogues(dtype, act, m):
    """quantize -> gate/up -> act(gate) * up, and quantize -> o + residual: value-exact against the torch
    composition the model runs (inputs normalized by torch, quantized by the kernels)."""
    g = torch.Generator().manual_seed(m)
    n, k = 24, 200
    gate, up, o = _ternary(n, k, g), _ternary(n, k, g), _ternary(k, n, g)
    fused = TernaryWeight(
        torch.cat([gate.codes, up.codes]), torch.cat([gate.scale.expand(n), up.scale.expand(n)])
    )
    norm, sub = _norm(k, dtype, g), _norm(n, dtype, g)
    xn = norm((torch.randn(m, k, generator=g) * 2).to(dtype))
    gv, uv = _ref(xn, gate, dtype), _ref(xn, up, dtype)
    h_ref = (F.relu(gv).square() if act == "relu2" else F.silu(gv)) * uv
    hn = sub(h_ref)
    resid = torch.randn(m, k, generator=g).to(dtype)
    out_ref = resid + _ref(hn, o, dtype)

    if m == 1:
        h = ternary_gemv(
            xn.to(DEV), _packed(fused), act=act, config=MMConfig(bn=16, bk=128, split_k=2, gemv=True)
        )
        out = ternary_gemv(hn.to(DEV), _packed(o), residual=resid.to(DEV))
    else:
        xq, a, _ = norm_quant(xn.to(DEV))
        h = ternary_mm(
            xq, a, _packed(fused), dtype, act=act, config=MMConfig(bm=16, bn=16, bk=128, split_k=2, swap=True)
        )
        xq, a, _ = norm_quant(hn.to(DEV))
        out = ternary_mm(xq, a, _packed(o), dtype, residual=resid.to(DEV))
    _, _, h_dense = norm_quant(torch.cat([gv, uv], dim=1).to(DEV), act=act, quant=False, store_float=True)
    if act == "relu2":  # products and roundings only: bit for bit
        assert torch.equal(h.cpu(), h_ref) and torch.equal(h_dense.cpu(), h_ref)
    else:  # silu's exp differs in its last bit between libraries
        tol = 2 * torch.finfo(dtype).eps
        assert torch.allclose(h.cpu().float(), h_ref.float(), rtol=tol, atol=tol * h_ref.abs().max().item())
        assert torch.allclose(
            h_dense.cpu().float(), h_ref.float(), rtol=tol, atol=tol * h_ref.abs().max().item()
        )
    assert torch.equal(out.cpu(), out_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_gain", [True, False])
def test_gemv_then_quant_equals_norm_quant_of_its_output(dtype, with_gain):
    """The last program of a GEMV normalizes and quantizes the output row as norm_quant does; a second launch
    finds the arrival counter zeroed again."""
    g = torch.Generator().manual_seed(11)
    tw = _ternary(130, 200, g)
    x = (torch.randn(1, 200, generator=g) * 2).to(dtype).to(DEV)
    gain = _norm(130, dtype, g).weight.to(DEV) if with_gain else None
    cfg = MMConfig(bn=16, bk=128, gemv=True)
    for _ in range(2):
        q2 = torch.empty(1, 130, dtype=torch.int8, device=DEV)
        a2 = torch.empty(1, dtype=torch.float32, device=DEV)
        y = ternary_gemv(x, _packed(tw), config=cfg, then_quant=(gain, q2, a2))
        assert torch.equal(y, ternary_gemv(x, _packed(tw), config=cfg))
        ref_q, ref_a, _ = norm_quant(y, gain)
        if gain is None:  # max and products only: exact
            assert torch.equal(q2, ref_q) and torch.equal(a2, ref_a)
        else:  # the sum of squares may be added in another order on the GPU (see the norm_quant test)
            assert (q2.int() - ref_q.int()).abs().max() <= 1
            assert torch.allclose(a2, ref_a, rtol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [None, "relu2"])
def test_resident_gemv_equals_the_tile_per_program_gemv(dtype, act):
    """Resident programs (several output tiles each) give the tile-per-program kernel's bytes from an int8
    row: the gated product, a residual (also read before the wait), an odd K and N (rows of 88 code words,
    read as pieces of 64 and 32 with 8 lanes idle). From a float row, normalized and quantized in registers
    (the sum of squares in another order), the same up to a rare one-step quantization difference."""
    g = torch.Generator().manual_seed(3)
    n, k = (2 * 45, 1300) if act else (77, 1300)
    tw = _ternary(n, k, g, per_row=True)
    x = (torch.randn(1, k, generator=g) * 2).to(dtype).to(DEV)
    gain = _norm(k, dtype, g).weight.to(DEV)
    xq, a, _ = norm_quant(x, gain)
    resid = None if act else torch.randn(1, n, generator=g).to(dtype).to(DEV)
    tile = MMConfig(bn=16, gemv=True)
    want = ternary_gemv(xq, _packed(tw), a=a, out_dtype=dtype, act=act, residual=resid, config=tile)
    want_f = ternary_gemv(x, _packed(tw), gain=gain, act=act, residual=resid, config=tile)
    # early: the residual read before the wait; resident 8: a program a tile (nothing requested for a next)
    for resident, early in ((1, False), (3, False), (3, True), (8, True)):
        cfg = MMConfig(bn=8, gemv=True, resident=resident)
        kw = dict(act=act, residual=resid, residual_early=early, config=cfg)
        assert torch.equal(ternary_gemv(xq, _packed(tw), a=a, out_dtype=dtype, **kw), want)
        got = ternary_gemv(x, _packed(tw), gain=gain, **kw)
        assert torch.allclose(got, want_f, rtol=1e-2, atol=1e-3 * want_f.abs().max().item())
    with pytest.raises(ValueError, match="resident"):
        ternary_gemv(x, _packed(tw), config=MMConfig(bn=8, gemv=True, resident=1, split_k=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_fused_norm_matches_separate_norm(dtype):
    """RMSNorm inside the GEMV computes what norm_quant + the pre-quantized GEMV compute, up to the rare
    one-step quantization difference a last-bit change of the norm can cause."""
    g = torch.Generator().manual_seed(7)
    tw = _ternary(64, 300, g)
    norm = _norm(300, dtype, g)
    x = (torch.randn(1, 300, generator=g) * 2).to(dtype)
    fused = ternary_gemv(x.to(DEV), _packed(tw), gain=norm.weight.to(DEV), out_dtype=torch.float32)
    xq, a, _ = norm_quant(x.to(DEV), norm.weight.to(DEV))
    separate = ternary_gemv(xq, _packed(tw), a=a, out_dtype=torch.float32)
    assert torch.allclose(fused, separate, rtol=1e-2, atol=1e-3 * separate.abs().max().item())


@pytest.mark.parametrize("m", [1, 20])
def test_int8_weight_product_is_exact(m):
    g = torch.Generator().manual_seed(m)
    w = int8_weight(torch.randn(72, 200, generator=g))
    x = torch.randn(m, 200, generator=g)
    xq, a = quantize_activations(x)
    ref = (xq.double() @ w.data.double().T).float() * (w.scale / a)
    dev_w = type(w)(w.layout, w.data.to(DEV), w.scale.to(DEV), w.shape)
    y = ternary_mm(xq.to(DEV), a[:, 0].to(DEV), dev_w, torch.float32, config=MMConfig(bm=16, bn=32, bk=64))
    assert torch.equal(y.cpu(), ref)


@pytest.mark.parametrize("rows", [1, 3])
def test_registered_kernel_matches_reference(rows):
    g = torch.Generator().manual_seed(rows)
    kernel = get_kernel("triton")
    assert kernel.device_type == "cuda" and kernel.priority > get_kernel("reference").priority
    tw = _ternary(40, 160, g)
    hf = pack(tw, "hf")
    pw = kernel.prepare(hf)
    pw = type(pw)(pw.layout, pw.data.to(DEV), pw.scale.to(DEV), pw.shape)
    x = torch.randn(2, rows, 160, generator=g)
    assert torch.equal(kernel.linear(x.to(DEV), pw).cpu(), reference_linear(x, hf))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_selects_the_triton_kernel():
    assert select_kernel("cuda").name == "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,block", [(1, None), (4, 16)])
def test_decode_attention_matches_rope_and_sdpa(dtype, splits, block):
    """One program per KV head, or the sequence split four ways (one split empty for the short row, three
    active for the long one) and combined by the last program to arrive (on a GPU also by every split
    sharing the columns); a second launch counts on from the arrival counters as the first left them, and
    a third from counters about to wrap past 2**31."""
    g = torch.Generator().manual_seed(0)
    b, h, kv, d, s = 2, 4, 2, 32, 80
    positions = torch.tensor([5, 70], dtype=torch.int32)
    qkv = torch.randn(b, (h + 2 * kv) * d, generator=g).to(dtype)
    k_cache = torch.randn(b, kv, s, d, generator=g).to(dtype)
    v_cache = torch.randn(b, kv, s, d, generator=g).to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(s).float()[:, None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    kd, vd = k_cache.to(DEV), v_cache.to(DEV)
    args = (qkv.to(DEV), cos.to(DEV), sin.to(DEV), positions.to(DEV), kd, vd, h, kv)
    out = decode_attention(*args, block=block, splits=splits).cpu()
    assert torch.equal(decode_attention(*args, block=block, splits=splits).cpu(), out)
    if splits > 1:
        with torch.inference_mode():  # the engine (inference mode) may have made the counters
            scratch_buffer(kd.device, b * kv, "attn_count")[: b * kv] = 2**31 - ROUND.value
        assert torch.equal(decode_attention(*args, block=block, splits=splits).cpu(), out)
        if DEV == "cuda":  # 16 programs: the splits share the combination unless told not to
            assert attention.spins(args[0], (b, kv, splits), d)
            assert torch.equal(decode_attention(*args, block=block, splits=splits, spin=False).cpu(), out)

    q, k, v = qkv.view(b, h + 2 * kv, 1, d).split([h, kv, kv], dim=1)
    pc, ps = cos[positions.long()][:, None], sin[positions.long()][:, None]
    q, k = apply_rope(q, pc, ps), apply_rope(k, pc, ps)
    for i, p in enumerate(positions.tolist()):
        k_cache[i, :, p], v_cache[i, :, p] = k[i, :, 0], v[i, :, 0]
    assert torch.equal(kd.cpu(), k_cache) and torch.equal(vd.cpu(), v_cache)
    mask = (torch.arange(s)[None, :] <= positions[:, None].long())[:, None, None, :]
    ref = F.scaled_dot_product_attention(
        q.float(), k_cache.float(), v_cache.float(), attn_mask=mask, enable_gqa=True
    )
    ref = ref.reshape(b, h * d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max() < tol


def test_decode_attention_rejects_splits_it_cannot_run():
    b, h, kv, d, s = 1, 4, 2, 32, 8
    cache = [torch.zeros(b, kv, s, d, device=DEV) for _ in range(2)]
    rope = [torch.zeros(s, d, device=DEV) for _ in range(2)]
    positions = torch.zeros(b, dtype=torch.int32, device=DEV)
    args = (torch.zeros(b, (h + 2 * kv) * d, device=DEV), *rope, positions, *cache, h, kv)
    with pytest.raises(ValueError, match="power of two up to 1024, not 3"):
        decode_attention(*args, splits=3)
    with pytest.raises(ValueError, match="cannot spin"):  # 64 splits of 32 columns: no share to combine
        decode_attention(*args, splits=64, spin=True)


@pytest.mark.skipif(DEV != "cuda", reason="the stamps are inline PTX: GPU only")
def test_probes_stamp_every_program_in_order_and_change_nothing():
    """With the probes' buffers set (benchmarks/gpu_gemv_probe.py), the resident GEMV and the split decode
    attention give the same bytes and every program writes its stamps, each cycle count after the one
    before (the attention's splits past the sequence's end: start, waited, arrived, done only)."""
    from pybitnet.kernels.triton import matmul

    g = torch.Generator().manual_seed(5)
    tw = _ternary(96, 700, g, per_row=True)
    x = torch.randn(1, 700, generator=g).to(torch.bfloat16).to(DEV)
    gain = _norm(700, torch.bfloat16, g).weight.to(DEV)
    cfg = MMConfig(bn=16, gemv=True, resident=1)
    b, h, kv, d, s = 1, 4, 2, 32, 80
    qkv = torch.randn(b, (h + 2 * kv) * d, generator=g).to(torch.bfloat16).to(DEV)
    cache = [torch.randn(b, kv, s, d, generator=g).to(torch.bfloat16).to(DEV) for _ in range(2)]
    cos, sin = (torch.rand(s, d, generator=g).to(torch.bfloat16).to(DEV) for _ in range(2))
    positions = torch.tensor([40], dtype=torch.int32, device=DEV)

    def run():
        k, v = (c.clone() for c in cache)
        y = ternary_gemv(x, _packed(tw), gain=gain, config=cfg)
        return y, decode_attention(qkv, cos, sin, positions, k, v, h, kv, block=16, splits=4)

    want = run()
    for probe, programs in ((matmul.PROBE, 132 * 4), (attention.PROBE, kv * 4)):
        probe.buffer = torch.zeros(2, programs, len(probe.points), dtype=torch.int64, device=DEV)
    try:
        got = run()
        stamps = matmul.PROBE.buffer.cpu(), attention.PROBE.buffer.cpu()
    finally:
        matmul.PROBE.buffer = attention.PROBE.buffer = None
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    gemv, att = (next(row for row in buf if row.any()) for buf in stamps)  # each launch's row
    gemv = gemv[:6]  # six tiles of 16 rows, a program each
    cycles = gemv[:, : matmul.PROBE.points.index("stored") + 1]
    assert (cycles[:, 1:] >= cycles[:, :-1]).all() and (cycles > 0).all()
    assert (gemv[:, -1] >= gemv[:, -3]).all() and (gemv[:, -3] > 0).all()  # global: stored >= start
    active = att[:, attention.PROBE.points.index("roped")] > 0
    assert active.sum() == kv * 3  # 41 positions in splits of 16: three active a head, one past the end
    cycles = att[active][:, : attention.PROBE.points.index("done") + 1]
    assert (cycles[:, 1:] >= cycles[:, :-1]).all()
    assert (att[:, attention.PROBE.points.index("global done")] > 0).all()


@pytest.mark.parametrize("h", [100, 2560])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_embedding_matches_torch(h, dtype, id_dtype):
    """The rows F.embedding gives (widths under one block and over two); an id outside the table gives
    zeros instead of reading past it."""
    g = torch.Generator().manual_seed(h)
    table = torch.randn(50, h, generator=g).to(dtype).to(DEV)
    tokens = torch.tensor([3, 0, 49, 3], dtype=id_dtype, device=DEV)
    assert torch.equal(embedding(tokens, table), F.embedding(tokens, table))
    out = embedding(torch.tensor([1, 50, -1], dtype=id_dtype, device=DEV), table)
    assert torch.equal(out[0], table[1]) and not out[1:].any()
    assert embedding(tokens[:0], table).shape == (0, h)


@pytest.mark.parametrize("v", [1, 7, 1024, 1025, 5003, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch(v, dtype):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(3, v, generator=g).to(dtype)
    x[1] = x[1].round()  # many ties: the first index of the maximum wins
    x[2, v // 2] = float("inf")
    if v > 2:
        x[2, v - 1] = float("inf")
    x = x.to(DEV)
    assert torch.equal(argmax_rows(x).cpu(), x.cpu().float().argmax(-1))
    assert torch.equal(argmax_rows(x[:, : max(1, v // 3)]).cpu(), x[:, : max(1, v // 3)].cpu().argmax(-1))


def test_argmax_rows_nan_and_infinite_rows_as_torch():
    x = torch.full((5, 3000), float("-inf"))
    x[1, 2500], x[1, 700] = float("nan"), 5.0  # a NaN beats any number
    x[2, 1200], x[2, 2900] = float("nan"), float("nan")  # the first NaN
    x[3] = float("inf")
    x[4, 1500], x[4, 2000] = -0.0, 0.0  # equal: the first
    ref = x.argmax(-1)
    assert ref.tolist() == [0, 2500, 1200, 0, 1500]
    assert torch.equal(argmax_rows(x.to(DEV)).cpu(), ref)
    with pytest.raises(ValueError, match="logits"):
        argmax_rows(torch.zeros(2, 0, device=DEV))


def test_greedy_advance_does_a_decode_steps_bookkeeping():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3001, generator=g).to(DEV)
    tokens = torch.zeros(5, dtype=torch.long, device=DEV)
    history = torch.full((5, 9), -1, dtype=torch.long, device=DEV)
    step = torch.tensor([3], device=DEV)
    positions = torch.arange(10, 15, dtype=torch.int32, device=DEV)
    for i in range(2):  # the arrival counters are back at zero after a launch
        greedy_advance(logits, tokens, history, step, positions)
        want = logits.argmax(-1)
        assert torch.equal(tokens, want)
        assert torch.equal(history[:, 3 + i], want)
        assert step.item() == 4 + i
        assert positions.tolist() == list(range(11 + i, 16 + i))
        logits = logits.roll(7, dims=1)
    assert (history[:, :3] == -1).all() and (history[:, 5:] == -1).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs compute capability 9.0",
)
def test_dependent_launches_in_a_graph_read_finished_results(monkeypatch):
    """A chain of 24 fused GEMVs and norm + quantize launches, each reading the row the one before wrote,
    captured in a CUDA graph with programmatic dependent launch (each kernel may start before the previous
    one ends): the same bits as the chain launched plainly, one kernel after the other."""
    from pybitnet.kernels.triton import common

    g = torch.Generator().manual_seed(5)
    k = 1536
    weights = []
    for _ in range(24):
        pw = pack(_ternary(k, k, g, per_row=True), "triton_i2")
        weights.append(type(pw)(pw.layout, pw.data.cuda(), pw.scale.cuda(), pw.shape))
    gain = (1 + 0.1 * torch.randn(k, generator=g)).to(torch.bfloat16).cuda()
    x0 = torch.randn(1, k, generator=g).to(torch.bfloat16).cuda()

    def chain() -> torch.Tensor:
        x = x0.clone()
        for i, w in enumerate(weights):
            if i % 2:
                xq, a, _ = norm_quant(x, gain)
                x = ternary_gemv(xq, w, a=a, out_dtype=x.dtype, residual=x)
            else:
                x = ternary_gemv(x, w, gain=gain, residual=x)
        return x

    monkeypatch.setattr(common, "PDL", False)
    ref = chain()
    monkeypatch.setattr(common, "PDL", True)
    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        out.zero_()
        graph.replay()
        assert torch.equal(out, ref)
