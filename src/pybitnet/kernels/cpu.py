"""Native CPU kernels: the C extension `pybitnet.kernels._cpu`, one registry entry per instruction set.

"cpu" runs the best instruction set this CPU has (AVX-512 VNNI, AVX2, NEON dotprod, else portable C) and is
the default on CPU; "cpu-avx512vnni", "cpu-avx2", "cpu-neondot" and "cpu-scalar" force one path. All take the
"cpu_i2" layout and give results identical, bit for bit, to the reference kernel.

Threads: $PYBITNET_THREADS, else the number of physical cores; `set_num_threads` changes it at run time.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Sequence

import torch

from ..errors import KernelError, LayoutError
from ..quant.layouts import PackedWeight
from ..quant.layouts.cpu_i2 import padded_cols, tiled_shape
from .registry import Kernel, register_kernel

try:
    from . import _cpu as _native
except ImportError:  # a source checkout without a build: the reference kernel still runs
    _native = None

THREADS_ENV = "PYBITNET_THREADS"
ISAS = {"scalar": 0, "avx2": 1, "avx512vnni": 2, "neondot": 3}
MAX_K = 2**16  # keeps |sum| < 2**24, so the int32 -> float32 conversion is exact as in the reference
# KV-cache element types the C attention reads (it widens bfloat16 exactly and computes in float32)
_KV_TYPES = {} if _native is None else {torch.float32: _native.KV_F32, torch.bfloat16: _native.KV_BF16}


def native_available() -> bool:
    return _native is not None


def isa_id(isa: str) -> int:
    """The C kernels' number of an instruction set named as in ISAS."""
    if isa not in ISAS:
        raise KernelError(f"unknown instruction set {isa!r}; one of {', '.join(ISAS)}")
    return ISAS[isa]


def isa_available(isa: str) -> bool:
    return _native is not None and _native.isa_available(isa_id(isa))


@functools.cache
def _best_isa_id() -> int:
    return ISAS[best_isa()]


@functools.cache
def best_isa() -> str:
    if _native is None:
        raise KernelError("the C kernels are not built; reinstall pybitnet (pip install .) with a C compiler")
    best = _native.best_isa()
    return next(name for name, i in ISAS.items() if i == best)


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no portable way to tell SMT siblings apart
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                with open(f"{topology}/{name}") as f:
                    cores.add(f.read().strip())
                break
            except OSError:
                continue
        else:
            cores.add(str(cpu))
    return max(1, len(cores))


_threads_set = False


def set_num_threads(n: int | None = None) -> int:
    """Threads the kernels use (None: $PYBITNET_THREADS or the physical cores); returns the number set."""
    global _threads_set
    if _native is None:
        raise KernelError("the C kernels are not built; reinstall pybitnet (pip install .) with a C compiler")
    if n is None:
        env = os.environ.get(THREADS_ENV)
        n = int(env) if env else physical_cores()
    if n < 1:
        raise KernelError(f"thread count must be >= 1, got {n}")
    _threads_set = True
    return _native.set_num_threads(n)


def get_num_threads() -> int:
    _ensure_threads()
    return 1 if _native is None else _native.get_num_threads()


def _ensure_threads() -> None:
    if not _threads_set and _native is not None:
        set_num_threads()


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise LayoutError(f"input has {x.shape[-1]} features but the weight expects {k}")
    if x.device.type != "cpu":
        raise KernelError(f"the CPU kernels take CPU tensors, got one on {x.device}")
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.to(torch.float32)
    return x2 if x2.is_contiguous() else x2.contiguous()


def _check(w: PackedWeight) -> None:
    out, cols = w.shape
    d = w.data
    if w.layout != "cpu_i2" or d.dtype != torch.uint8 or tuple(d.shape) != tiled_shape(out, cols):
        raise LayoutError(
            f"the CPU kernels take cpu_i2 uint8 {list(tiled_shape(out, cols))} for a {out}x{cols} weight, "
            f"got {w.layout!r} {d.dtype} {tuple(d.shape)}; prepare the weight with the kernel"
        )
    if not d.is_contiguous() or d.device.type != "cpu":
        raise LayoutError("cpu_i2 weights must be contiguous CPU tensors")
    if w.scale.dtype != torch.float32 or not w.scale.is_contiguous() or w.scale.numel() not in (1, out):
        raise LayoutError(f"cpu_i2 scale must be contiguous float32 with 1 or {out} values")
    if cols > MAX_K:
        raise KernelError(f"the CPU kernels take at most {MAX_K} input features, got {cols}")


class _Plan:
    """A validated group of weights sharing one input: the native call's matrix descriptors, made once.

    It holds addresses, not tensors, so a cached plan never keeps a model's weights alive."""

    def __init__(self, weights: Sequence[PackedWeight]) -> None:
        k = weights[0].shape[1]
        for w in weights:
            _check(w)
            if w.shape[1] != k:
                raise LayoutError("weights fused in one call must share their input size")
        self.k = k
        self.sizes = [w.shape[0] for w in weights]
        self.total = sum(self.sizes)
        self.offsets = [sum(self.sizes[:i]) * 4 for i in range(len(weights))]
        self.mats = [
            (w.data.data_ptr(), w.shape[0], w.scale.data_ptr(), int(w.scale.numel() > 1)) for w in weights
        ]


_PLANS: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], _Plan]] = {}
MAX_PLANS = 4096


def _plan(weights: Sequence[PackedWeight]) -> _Plan:
    # Layers hand out the same PackedWeight objects while their buffers stay the same tensors, so a plan is
    # found by the objects' identities; weak references make sure a reused id is never mistaken for them.
    key = tuple(map(id, weights))
    entry = _PLANS.get(key)
    if entry is not None and all(ref() is w for ref, w in zip(entry[0], weights, strict=True)):
        return entry[1]
    if len(_PLANS) >= MAX_PLANS:  # models come and go (tests, reloads): keep the cache bounded
        _PLANS.clear()
    plan = _Plan(weights)
    _PLANS[key] = (tuple(weakref.ref(w) for w in weights), plan)
    return plan


def linear_many(
    isa: int, x: torch.Tensor, weights: Sequence[PackedWeight], norm: tuple[torch.Tensor, float] | None = None
) -> list[torch.Tensor]:
    """x' @ W_i.T for each weight; x' = rms_norm(x) * weight for `norm` = (weight, eps), else x.

    One native call: the activations are normalized and quantized once and every weight's rows are spread over
    the threads in one parallel region. Outputs are views of one [.., sum(out)] buffer, in x's dtype.
    """
    _ensure_threads()
    plan = _plan(weights)
    x2 = _rows(x, plan.k)
    m, total = x2.shape[0], plan.total
    y = torch.empty((m, total), dtype=torch.float32)
    yp = y.data_ptr()
    mats = [(*d, yp + off, total) for d, off in zip(plan.mats, plan.offsets, strict=True)]
    norm_ptr, eps = 0, 0.0
    if norm is not None:
        nw = norm[0]
        if nw.dtype != torch.float32 or not nw.is_contiguous():
            nw = nw.detach().to(torch.float32).contiguous()
        if nw.numel() != plan.k:
            raise LayoutError(f"norm weight has {nw.numel()} values, expected {plan.k}")
        norm_ptr, eps = nw.data_ptr(), float(norm[1])
    if m:
        _native.ternary(isa, x2.data_ptr(), m, plan.k, plan.k, norm_ptr, eps, mats)
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    y = y.view(*x.shape[:-1], total)
    return [y] if len(plan.sizes) == 1 else list(y.split(plan.sizes, dim=-1))


def run_head(
    bits: int,
    x: torch.Tensor,
    norm_ptr: int,
    eps: float,
    q: torch.Tensor,
    scale: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """y = quant(rms_norm?(x)) @ (w * scale).T on the best instruction set; x float32 [M, K] contiguous,
    scale float32 [N], y float32 [M, N]; w int8 tiles [ceil(N/4), Kp/32, 4, 32] (bits 8) or 4-bit nibble tiles
    uint8 [ceil(N/4), Kp/64, 4, 32] (bits 4), Kp = K rounded up to 128 (see csrc/bitnet_cpu.h)."""
    _ensure_threads()
    m, k = x.shape
    n = scale.numel()
    chunk, dtype = (32, torch.int8) if bits == 8 else (64, torch.uint8)
    tiles = (-(-n // 4), padded_cols(k) // chunk, 4, 32)
    if q.dtype != dtype or tuple(q.shape) != tiles or not q.is_contiguous():
        raise LayoutError(
            f"a {bits}-bit head must be contiguous {dtype} {list(tiles)}, got {q.dtype} {tuple(q.shape)}"
        )
    if scale.dtype != torch.float32 or tuple(y.shape) != (m, n) or y.dtype != torch.float32:
        raise LayoutError("head: scale must be float32 [N] and y float32 [M, N]")
    if k > MAX_K // 2:
        raise KernelError(f"the output head takes at most {MAX_K // 2} input features, got {k}")
    ptrs = (q.data_ptr(), n, scale.data_ptr(), y.data_ptr(), n)
    _native.head(_best_isa_id(), bits, x.data_ptr(), m, k, k, norm_ptr, eps, *ptrs)


def kv_type(dtype: torch.dtype) -> int | None:
    """The C code's id of a KV-cache element type (float32 or bfloat16); None for any other dtype."""
    return _KV_TYPES.get(dtype)


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether decode_attention takes these: q, k, v [B, T, *] float32 views of one fused projection buffer
    (as linear_many returns them) and a float32 or bfloat16 cache layer [B', KVH, S, D] with contiguous key
    rows."""
    row = q.stride(-2) if q.dim() > 1 else q.shape[-1]
    return (
        q.dtype == k.dtype == v.dtype == torch.float32
        and kv_type(cache_k.dtype) is not None
        and q.device.type == "cpu"
        and q.stride(-1) == 1
        and k.data_ptr() == q.data_ptr() + 4 * q.shape[-1]
        and v.data_ptr() == k.data_ptr() + 4 * k.shape[-1]
        and q.stride() == k.stride() == v.stride()
        and (q.shape[0] == 1 or q.stride(0) == q.shape[1] * row)
        and cache_k.dim() == 4
        and cache_k.stride(3) == 1
        and cache_k.stride(2) == cache_k.shape[3]
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    positions: torch.Tensor,
    heads: int,
    scale: float,
) -> torch.Tensor:
    """RoPE, KV cache write and causal attention for a few new tokens, in one native call.

    q, k, v: [B, T, H*D], [B, T, KVH*D] projections before RoPE (see attention_fits); cos, sin [B, T, D];
    cache_k, cache_v: one layer's cache [B', KVH, S, D] (B' >= B), float32 or bfloat16; positions [B, T]:
    token (b, t) is written at positions[b, t] (rounded to the cache's dtype) and attends to keys
    0..positions[b, t] as the cache holds them. Returns [B, T, H*D] float32."""
    _ensure_threads()
    b, t, _ = q.shape
    kvh, keys, d = cache_k.shape[1], cache_k.shape[2], cache_k.shape[3]
    if cache_v.stride() != cache_k.stride() or cache_v.shape != cache_k.shape or cache_k.shape[0] < b:
        raise LayoutError("the key and value caches must have the same shape and strides")
    kind = kv_type(cache_k.dtype)
    if kind is None or cache_v.dtype != cache_k.dtype:
        raise LayoutError(f"the KV cache must be float32 or bfloat16, got {cache_k.dtype}, {cache_v.dtype}")
    if q.shape[-1] != heads * d or k.shape[-1] != kvh * d or tuple(cos.shape) != (b, t, d):
        raise LayoutError(f"attention shapes do not match: q {tuple(q.shape)}, cache {tuple(cache_k.shape)}")
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    pos = positions.to(torch.int64).contiguous()
    out = torch.empty((b, t, heads * d), dtype=torch.float32)
    _native.attention(
        q.data_ptr(),
        q.stride(-2),
        cos.data_ptr(),
        sin.data_ptr(),
        cache_k.data_ptr(),
        cache_v.data_ptr(),
        cache_k.stride(0),
        cache_k.stride(1),
        pos.data_ptr(),
        out.data_ptr(),
        b,
        heads,
        kvh,
        t,
        keys,
        d,
        scale,
        kind,
    )
    return out


def linear(isa: int, x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    return linear_many(isa, x, [w])[0]


def linear_quantized(isa: str, xq: torch.Tensor, a: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """The integer core on given int8 activations [M, K] and factors a [M]: y = acc * s / a, float32 [M, N].

    For tests of the integer path with any int8 values, -128 included."""
    _check(w)
    out, cols = w.shape
    m = xq.shape[0]
    kp = padded_cols(cols)
    if xq.dtype != torch.int8 or tuple(xq.shape) != (m, cols):
        raise LayoutError(f"xq must be int8 [M, {cols}]")
    ldq = -(-kp // 64) * 64
    buf = torch.zeros((m, ldq), dtype=torch.int8)
    buf[:, :cols] = xq
    rowsum = xq.to(torch.int32).sum(-1, dtype=torch.int32).contiguous()
    a = a.reshape(m).to(torch.float32).contiguous()
    y = torch.empty((m, out), dtype=torch.float32)
    mats = [(w.data.data_ptr(), out, w.scale.data_ptr(), int(w.scale.numel() > 1), y.data_ptr(), out)]
    _native.ternary_q(isa_id(isa), buf.data_ptr(), ldq, a.data_ptr(), rowsum.data_ptr(), m, kp, mats)
    return y


def argmax(x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """torch.argmax(x, dim=-1), the same indices (the first NaN, else the first maximum), through the C
    kernels (the best instruction set, or `isa`) for a float32 CPU tensor: torch's CPU argmax is a scalar
    loop, ~140 µs for a 128k-token row of logits, a few per cent of a CPU decode step. Other tensors go to
    torch."""
    native = _native is not None and x.device.type == "cpu" and x.dtype == torch.float32
    if not native or x.dim() == 0 or x.shape[-1] == 0:
        return x.argmax(dim=-1)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1 or x2.stride(0) < n:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], dtype=torch.int64)
    if x2.shape[0]:
        isa_number = _best_isa_id() if isa is None else isa_id(isa)
        _native.argmax(isa_number, x2.data_ptr(), x2.shape[0], n, x2.stride(0), out.data_ptr())
    return out.view(x.shape[:-1])


def quantize(isa: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Native per-row activation quantization: (xq int8 [M, K], a float32 [M, 1]) as quantize_activations."""
    x2 = _rows(x, x.shape[-1])
    m, k = x2.shape
    kp = padded_cols(k)
    xq = torch.empty((m, kp), dtype=torch.int8)
    a = torch.empty(m, dtype=torch.float32)
    rowsum = torch.empty(m, dtype=torch.int32)
    _native.quantize(
        isa_id(isa), x2.data_ptr(), m, k, k, xq.data_ptr(), kp, kp, a.data_ptr(), rowsum.data_ptr()
    )
    return xq[:, :k], a[:, None]


def _register(name: str, isa: str | None, priority: int, description: str) -> Kernel:
    if isa is None:  # "cpu": the best instruction set, chosen when first called

        def run(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
            return linear_many(_best_isa_id(), x, [w])[0]

        def run_many(x, ws, norm=None):
            return linear_many(_best_isa_id(), x, ws, norm)

        available = native_available
    else:
        run = functools.partial(linear, isa_id(isa))
        run_many = functools.partial(linear_many, isa_id(isa))

        def available() -> bool:
            return isa_available(isa)

    return register_kernel(
        Kernel(
            name=name,
            device_type="cpu",
            layout="cpu_i2",
            linear=run,
            linear_many=run_many,
            priority=priority,
            isa=isa or "native",
            is_available=available,
            description=description,
        )
    )


CPU = _register("cpu", None, 50, "C kernels, the best instruction set of this CPU")
CPU_AVX512VNNI = _register("cpu-avx512vnni", "avx512vnni", 40, "C kernels, AVX-512 VNNI (x86-64)")
CPU_AVX2 = _register("cpu-avx2", "avx2", 30, "C kernels, AVX2 (x86-64)")
CPU_NEONDOT = _register("cpu-neondot", "neondot", 30, "C kernels, NEON with dot product (arm64)")
CPU_SCALAR = _register("cpu-scalar", "scalar", 10, "C kernels, portable scalar code")
