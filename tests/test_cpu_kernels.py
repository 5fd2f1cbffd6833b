"""The C kernels against the reference kernel: bit-exact outputs on every instruction set this CPU runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pybitnet.errors import KernelError, LayoutError
from pybitnet.kernels import cpu, get_kernel, select_kernel
from pybitnet.kernels.reference import reference_linear
from pybitnet.quant import TernaryWeight, pack, quantize_activations, unpack

pytestmark = pytest.mark.skipif(not cpu.native_available(), reason="the C kernels are not built")

ROOT = Path(__file__).resolve().parents[1]
PATHS = [name for name in ("scalar", "avx2", "avx512vnni", "neondot") if cpu.isa_available(name)]
FAST_PATHS = [p for p in PATHS if p != "scalar"] or ["scalar"]
# (out, in, tokens): the 2B-4T and 3B shapes, sizes that are not multiples of 4 rows or 128 columns, odd M
SHAPES = [
    (2560, 2560, 1),
    (6912, 2560, 3),
    (2560, 6912, 1),
    (3200, 8640, 5),
    (8640, 3200, 1),
    (37, 3200, 67),
    (101, 2560, 9),
    (5, 129, 4),
    (1, 1, 1),
    (7, 200, 130),
]


def random_weight(out: int, cols: int, seed: int, per_row: bool = False) -> TernaryWeight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (out, cols), generator=g, dtype=torch.int8)
    scale = torch.rand(out if per_row else (), generator=g) * 0.1 + 0.01
    return TernaryWeight(codes, scale)


def test_cpu_is_the_default_on_cpu():
    assert select_kernel("cpu").name == "cpu"
    assert get_kernel("cpu").layout == "cpu_i2"


def test_layout_round_trip():
    for out, cols in [(1, 1), (5, 129), (6912, 2560), (37, 3200)]:
        tw = random_weight(out, cols, 1, per_row=out == 37)
        pw = pack(tw, "cpu_i2")
        back = unpack(pw)
        assert torch.equal(back.codes, tw.codes)
        assert torch.equal(back.scale, tw.scale.float())


# The portable path is slow: it runs the shapes up to 3M multiply-adds here; the larger ones run on the vector
# paths here and on every path in csrc/tests/test_kernels.c.
EXACT_CASES = [
    (isa, *shape)
    for isa in PATHS
    for shape in SHAPES
    if isa != "scalar" or shape[0] * shape[1] * shape[2] <= 3_000_000
]


@pytest.mark.parametrize(("isa", "out", "cols", "tokens"), EXACT_CASES)
def test_exact_vs_reference(isa, out, cols, tokens):
    tw = random_weight(out, cols, out + cols + tokens, per_row=out % 2 == 1)
    hf = pack(tw, "hf")
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)) * 3
    kernel = get_kernel(f"cpu-{isa}")
    y = kernel.linear(x, kernel.prepare(hf))
    assert torch.equal(y, reference_linear(x, hf))


@pytest.mark.parametrize("isa", FAST_PATHS)
def test_saturating_activations(isa):
    """Rows of +-127 against all-(+1) / all-(-1) weights: the largest sums the int16 stages can see."""
    cols = 8640
    codes = torch.ones((8, cols), dtype=torch.int8)
    codes[1::2] = -1
    hf = pack(TernaryWeight(codes, torch.tensor(1.0)), "hf")
    x = torch.ones((6, cols))
    x[1::2] = -1
    xq, _ = quantize_activations(x)
    assert xq.abs().min() == 127
    kernel = get_kernel(f"cpu-{isa}")
    y = kernel.linear(x, kernel.prepare(hf))
    assert torch.equal(y, reference_linear(x, hf))
    assert y.abs().max() == pytest.approx(cols, rel=1e-6)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("rows", [3, 6])  # the GEMV and the tiled GEMM (int16 lanes reach -32768 in it)
def test_integer_core_with_minus_128(isa, rows):
    cols, out = 2560, 12
    tw = TernaryWeight(torch.ones((out, cols), dtype=torch.int8), torch.tensor(1.0))
    w = pack(tw, "cpu_i2")
    for value in (-128, 127):
        xq = torch.full((rows, cols), value, dtype=torch.int8)
        y = cpu.linear_quantized(isa, xq, torch.ones(rows), w)
        assert torch.equal(y, torch.full((rows, out), float(value * cols)))


@pytest.mark.parametrize("isa", PATHS)
def test_quantization_matches_torch(isa):
    x = torch.randn(9, 1000, generator=torch.Generator().manual_seed(3)) * 5
    x[0] = 0  # all-zero row: the 1e-5 clamp
    x[1, ::7] = 0.5 / 127  # ties at .5 round to even
    xq, a = cpu.quantize(isa, x)
    ref_q, ref_a = quantize_activations(x)
    assert torch.equal(xq, ref_q)
    assert torch.equal(a, ref_a)


@pytest.mark.parametrize("isa", PATHS)
def test_argmax_matches_torch(isa):
    """The first NaN, else the first maximum, as torch.argmax: ties, infinities, signed zeros, strides."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (6, 1003), generator=g).float()  # many ties
    x[1, 500] = float("nan")
    x[2, :] = float("-inf")
    x[3, 7], x[3, 900] = float("inf"), float("inf")
    x[4] = 0.0
    x[4, 3] = -0.0
    x[5, 1002] = 9.0  # the maximum in the last, partial vector
    assert torch.equal(cpu.argmax(x, isa), x.argmax(-1))
    logits = torch.randn(2, 3, 128256, generator=g)
    assert torch.equal(cpu.argmax(logits, isa), logits.argmax(-1))
    assert torch.equal(cpu.argmax(logits[:, -1], isa), logits[:, -1].argmax(-1))  # rows 3 * V apart
    assert torch.equal(cpu.argmax(logits[0, :, ::2], isa), logits[0, :, ::2].argmax(-1))
    short = torch.tensor([[float("nan"), 1.0], [2.0, float("nan")], [1.0, 1.0]])
    assert torch.equal(cpu.argmax(short, isa), short.argmax(-1))
    half = x.half()  # not float32: torch's own
    assert torch.equal(cpu.argmax(half), half.argmax(-1))
    with pytest.raises(KernelError, match="unknown instruction set 'avx9'; one of scalar, avx2"):
        cpu.argmax(x, "avx9")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1.0]),
        min_size=1,
        max_size=40,
    )
)
def test_argmax_any_row(values):
    x = torch.tensor([values], dtype=torch.float32)
    for isa in PATHS:
        assert torch.equal(cpu.argmax(x, isa), x.argmax(-1)), isa


def test_fused_projections_share_one_quantization():
    """linear_many equals separate calls, and with a norm equals RMSNorm then linear (to float rounding)."""
    kernel = get_kernel("cpu")
    ws = [kernel.prepare(pack(random_weight(n, 2560, n), "hf")) for n in (2560, 640, 640)]
    x = torch.randn(3, 2560)
    fused = kernel.linear_many(x, ws)
    for w, y in zip(ws, fused, strict=True):
        assert torch.equal(y, kernel.linear(x, w))
    norm_w = torch.rand(2560) + 0.5
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
    with_norm = kernel.linear_many(x, ws, (norm_w, 1e-5))
    for w, y in zip(ws, with_norm, strict=True):
        ref = kernel.linear(normed, w)
        assert torch.allclose(y, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_threads_do_not_change_results():
    kernel = get_kernel("cpu")
    w = kernel.prepare(pack(random_weight(1000, 2560, 5), "hf"))
    x = torch.randn(17, 2560)
    before = cpu.get_num_threads()
    try:
        cpu.set_num_threads(1)
        one = kernel.linear(x, w)
        cpu.set_num_threads(3)
        three = kernel.linear(x, w)
    finally:
        cpu.set_num_threads(before)
    assert torch.equal(one, three)


def test_bad_inputs_raise_typed_errors():
    kernel = get_kernel("cpu")
    w = kernel.prepare(pack(random_weight(8, 256, 0), "hf"))
    with pytest.raises(LayoutError):
        kernel.linear(torch.randn(2, 255), w)
    with pytest.raises(LayoutError):
        kernel.linear(torch.randn(2, 256), pack(random_weight(8, 256, 0), "hf"))
    with pytest.raises(KernelError):
        cpu.set_num_threads(0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_c_kernels_under_sanitizers(tmp_path):
    """Builds csrc/ with AddressSanitizer + UBSan and runs the standalone C kernel test (every ISA path)."""
    if os.environ.get("PYBITNET_SKIP_SANITIZE"):
        pytest.skip("PYBITNET_SKIP_SANITIZE is set")
    cfg = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Debug"]
    cfg += ["-DPYBITNET_SANITIZE=ON", "-DPYBITNET_KERNEL_TESTS=ON"]
    subprocess.run(cfg, check=True, capture_output=True)
    subprocess.run(
        ["cmake", "--build", str(tmp_path), "--target", "test_kernels"], check=True, capture_output=True
    )
    run = subprocess.run([str(tmp_path / "test_kernels")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failed" in run.stdout


ARM_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"


@pytest.mark.slow
@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("cmake", ARM_CC, QEMU)), reason=f"needs cmake, {ARM_CC} and {QEMU}"
)
def test_c_kernels_on_arm_under_qemu(tmp_path):
    """The ARM NEON (dotprod) kernels, which no x86 machine runs: csrc/ cross-compiled for aarch64 and the
    standalone C kernel test run under QEMU's user-mode emulation (a CPU with every extension)."""
    cfg = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release"]
    cfg += ["-DPYBITNET_KERNEL_TESTS=ON", "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64"]
    subprocess.run([*cfg, f"-DCMAKE_C_COMPILER={ARM_CC}"], check=True, capture_output=True)
    subprocess.run(
        ["cmake", "--build", str(tmp_path), "--target", "test_kernels"], check=True, capture_output=True
    )
    # QEMU loads the program's libraries from the prefix of the cross compiler's own libc (lib/libc.so.6)
    libc = subprocess.run([ARM_CC, "-print-file-name=libc.so.6"], capture_output=True, text=True).stdout
    env = {**os.environ, "QEMU_LD_PREFIX": str(Path(libc.strip()).resolve().parent.parent)}
    prog = [QEMU, "-cpu", "max", str(tmp_path / "test_kernels")]
    run = subprocess.run(prog, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "neondot" in run.stdout and " 0 failed" in run.stdout, run.stdout


def test_int8_head_matches_integer_reference():
    from pybitnet.kernels.cpu_head import Int8Head

    g = torch.Generator().manual_seed(7)
    w = torch.randn(1003, 300, generator=g)
    head = Int8Head.from_float(w)
    assert head.q.shape == (251, 12, 4, 32) and head.q.abs().max() == 127
    assert torch.allclose(head.dequantize(), w, atol=w.abs().amax(1, keepdim=True).max().item() / 254)
    x = torch.randn(2, 3, 300, generator=g)
    xq, a = quantize_activations(x)
    acc = xq.double() @ head.rows().double().T
    ref = (acc.float() * (head.scale / a)).float()
    assert torch.equal(head(x), ref)


def test_int4_head_matches_integer_reference():
    from pybitnet.kernels.cpu_head import Int4Head

    g = torch.Generator().manual_seed(8)
    w = torch.randn(1003, 300, generator=g)
    w[5, 7] = 40.0  # an outlier row: its range is clipped rather than spent on one value
    head = Int4Head.from_float(w)
    assert head.q.shape == (251, 6, 4, 32) and head.q.dtype == torch.uint8
    rows = head.rows()
    assert rows.abs().max() == 7 and rows.shape == (1003, 300)
    err = (head.dequantize() - w).pow(2).sum(1)
    plain = w.abs().amax(1) / 7  # absmax scales: the clip search never does worse
    assert (err <= ((w / plain[:, None]).round() * plain[:, None] - w).pow(2).sum(1) + 1e-4).all()
    x = torch.randn(2, 3, 300, generator=g)
    xq, a = quantize_activations(x)
    acc = xq.double() @ rows.double().T
    assert torch.equal(head(x), (acc.float() * (head.scale / a)).float())


def test_decode_attention_matches_torch():
    """RoPE + cache write + causal GQA attention in C against apply_rope, KVCache.update and SDPA."""
    from pybitnet.models.kv_cache import KVCache
    from pybitnet.models.transformer import apply_rope

    g = torch.Generator().manual_seed(2)
    b, t, h, kvh, s, d = 2, 2, 8, 2, 40, 64
    fused = torch.randn(b, t, (h + 2 * kvh) * d, generator=g)
    q, k, v = fused.split([h * d, kvh * d, kvh * d], -1)
    ang = torch.rand(b, t, d, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    positions = torch.tensor([[10, 11], [30, 31]])
    ours, ref = KVCache(1, 3, kvh, s, d), KVCache(1, 3, kvh, s, d)
    for c in (ours, ref):
        c.k.normal_(generator=torch.Generator().manual_seed(5))
        c.v.normal_(generator=torch.Generator().manual_seed(6))
    assert cpu.attention_fits(q, k, v, ours.k[0])
    out = cpu.decode_attention(q, k, v, cos, sin, ours.k[0], ours.v[0], positions, h, d**-0.5)
    qh = apply_rope(q.view(b, t, h, d).transpose(1, 2), cos, sin)
    kh = apply_rope(k.view(b, t, kvh, d).transpose(1, 2), cos, sin)
    keys, values = ref.update(0, positions, kh, v.view(b, t, kvh, d).transpose(1, 2))
    mask = torch.arange(s)[None, None, None, :] <= positions[:, None, :, None]
    want = torch.nn.functional.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(ours.k, ref.k, atol=1e-6) and torch.equal(ours.v, ref.v)
    assert torch.allclose(out, want.transpose(1, 2).reshape(b, t, h * d), atol=1e-5)
    with pytest.raises(ValueError):
        cpu.decode_attention(q, k, v, cos, sin, ours.k[0], ours.v[0], positions + s, h, d**-0.5)


def test_model_on_c_kernels_matches_reference_model():
    """Fused QKV/gate-up, RMSNorm fused into quantization, C decode attention, int8 head: same top-1."""
    from pybitnet.models.presets import preset
    from pybitnet.models.random_init import random_model

    cfg = preset("tiny-bitnet")
    ref, nat = random_model(cfg, seed=3, kernel="reference"), random_model(cfg, seed=3, kernel="cpu")
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lr, ln = ref(ids), nat(ids)
        assert nat.lm_head_int8 is not None and ref.lm_head_int8 is None
        assert (lr.argmax(-1) == ln.argmax(-1)).float().mean() > 0.9
        nat.head_mode = "float"
        assert torch.allclose(nat(ids), lr, atol=1e-3 * lr.abs().max().item())
        cache = nat.new_cache(2, 16, dtype=torch.float32)  # float rounding only (bfloat16 adds its own)
        steps = [nat(ids[:, :8], torch.arange(8).expand(2, -1), cache)]
        steps += [nat(ids[:, i : i + 1], torch.full((2, 1), i), cache) for i in range(8, 12)]
        assert torch.allclose(torch.cat(steps, 1), nat(ids), atol=1e-4 * lr.abs().max().item())
