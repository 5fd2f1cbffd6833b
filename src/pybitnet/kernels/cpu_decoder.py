"""A model's decoder layers as one call into the C kernels.

On the torch path a decode step of a 30-layer model makes ~150 native calls with Python and small torch ops
between them (splits, views, relu², residual adds, dtype casts): about a fifth of the step. Here the whole
stack of layers is one call (csrc/decoder.c) that runs, per layer, the same float32 math in the same order as
the model's code on the C kernels — norm + quantization, fused QKV, RoPE + cache write + attention, sub-norm +
o-proj + residual, norm + fused gate/up, relu² (or SiLU) gating, sub-norm + down-proj + residual — with the
thread pool kept hot from the first kernel to the last.

The model is read through its module names (those of the HF checkpoints), so this layer needs nothing from
the model code; `NativeDecoder.for_model` returns None for a model it cannot run (another kernel, biases,
caches of another dtype than float32 or bfloat16 ...) and the caller keeps the torch path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from . import cpu

# New tokens per sequence per native call: bounds the activation buffers of long prompts (~15 MB for 2B-4T);
# the GEMM reuses an unpacked weight tile for 64 activation rows at a time, so longer chunks gain nothing.
CHUNK = 128


def _norm(module: nn.Module | None) -> torch.Tensor | None:
    """The float32 weight of an RMSNorm of the model (x * rsqrt(mean(x²) + eps) * weight), as the C code
    applies it when quantizing."""
    if module is None:
        return None
    return module.weight.detach().to(torch.float32).contiguous()


def _kernel_isa(m: nn.Module) -> int | None:
    """The ISA id of a linear on the C kernels (plain, bias-free, cpu_i2); None for any other module."""
    kernel = getattr(m, "kernel", None)
    if (
        kernel is None
        or kernel.device_type != "cpu"
        or getattr(m, "layout", None) != "cpu_i2"
        or getattr(m, "bias", None) is not None
        or getattr(m, "input_norm", None) is not None
    ):
        return None
    return cpu._best_isa_id() if kernel.isa == "native" else cpu.ISAS.get(kernel.isa)


def _is_rms_norm(m: nn.Module | None, optional: bool = False) -> bool:
    if m is None:
        return optional
    return type(m).__name__ == "RMSNorm" and isinstance(getattr(m, "eps", None), float)


_edits = [0]  # module / parameter / buffer registrations so far, in any module of this process


def _count_edit(module: nn.Module, name: str, value: object) -> None:
    _edits[0] += 1


register_module_module_registration_hook(_count_edit)
register_module_parameter_registration_hook(_count_edit)
register_module_buffer_registration_hook(_count_edit)


def _forget_plan(module: nn.Module, incompatible_keys) -> None:
    module.__dict__.pop("_native_decoder", None)


class NativeDecoder:
    """Every decoder layer of `model` in one native call per forward (see the module docstring)."""

    def __init__(self, model: nn.Module, isa: int) -> None:
        config = model.config
        self.isa = isa
        self.config = config
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        # What the native decoder reads and where the model holds it: every forward checks that the modules
        # and tensors are still the model's (same objects, same storage), so swapping a module, replacing a
        # weight or casting the model rebuilds the plan instead of running stale addresses.
        # (The checks run map() over flat lists, ~20 us a forward; the lists hold the objects, so their ids
        # cannot be reused while the plan lives.)
        self._stores: list[dict] = []  # _modules / _parameters / _buffers dicts
        self._names: list[str] = []
        self._objects: list[object] = []
        self._ids: list[int] = []
        self._params: list[torch.Tensor] = []  # `param.data = ...` (as .to() does) keeps the object
        self._param_ptrs: list[int] = []
        self._keep: list[torch.Tensor] = []  # float32 copies of norm weights the C code reads
        layers = [self._layer(self._child(model.layers, str(i))) for i in range(len(model.layers))]
        self._probe = self._params[0]  # the first norm weight: `.to()` moves it with everything else
        self._probe_ptr = self._probe.data_ptr()
        act = cpu._native.ACT_RELU2 if config.hidden_act == "relu2" else cpu._native.ACT_SILU
        self._handle = cpu._native.decoder_new(
            config.hidden_size,
            config.intermediate_size,
            self.heads,
            self.kv_heads,
            self.head_dim,
            float(config.rms_norm_eps),
            self.head_dim**-0.5,
            act,
            layers,
        )

    def _watch(self, store: dict, name: str):
        obj = store.get(name)
        self._stores.append(store)
        self._names.append(name)
        self._objects.append(obj)
        self._ids.append(id(obj))
        return obj

    def _child(self, owner: nn.Module, name: str) -> nn.Module | None:
        return self._watch(owner._modules, name)

    def _tensor(self, module: nn.Module, name: str) -> torch.Tensor:
        is_param = name in module._parameters
        t = self._watch(module._parameters if is_param else module._buffers, name)
        if is_param:
            self._params.append(t)
            self._param_ptrs.append(t.data_ptr())
        return t

    def _norm_ptr(self, module: nn.Module | None) -> int:
        if module is None:
            return 0
        self._tensor(module, "weight")
        w = _norm(module)
        self._keep.append(w)
        return w.data_ptr()

    def _mat(self, linear: nn.Module) -> tuple[int, int, int, int]:
        packed, scale = self._tensor(linear, "packed"), self._tensor(linear, "scale")
        cpu._check(linear.weight())
        return (packed.data_ptr(), linear.out_features, scale.data_ptr(), int(scale.numel() > 1))

    def _layer(self, block: nn.Module) -> tuple:
        attn, mlp = self._child(block, "self_attn"), self._child(block, "mlp")
        norms = [
            self._norm_ptr(self._child(owner, name))
            for owner, name in (
                (block, "input_layernorm"),
                (attn, "attn_sub_norm"),
                (block, "post_attention_layernorm"),
                (mlp, "ffn_sub_norm"),
            )
        ]
        attn_mats = [self._mat(self._child(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mlp_mats = [self._mat(self._child(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        return (*norms, *attn_mats, *mlp_mats)

    def is_current(self) -> bool:
        current = map(id, map(dict.get, self._stores, self._names))
        return (
            list(current) == self._ids and list(map(torch.Tensor.data_ptr, self._params)) == self._param_ptrs
        )

    @staticmethod
    def supports(model: nn.Module) -> int | None:
        """The ISA id the model's linears all run on, when this class can run its layers; else None."""
        if not cpu.native_available() or not len(getattr(model, "layers", ())):
            return None
        config = model.config
        widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim)
        if config.hidden_act not in ("relu2", "silu") or max(widths) > cpu.MAX_K:
            return None
        isa = _kernel_isa(model.layers[0].self_attn.q_proj)
        if isa is None:
            return None
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            linears += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if any(_kernel_isa(m) != isa for m in linears):
                return None
            norms_ok = _is_rms_norm(block.input_layernorm) and _is_rms_norm(block.post_attention_layernorm)
            subs_ok = _is_rms_norm(attn.attn_sub_norm, True) and _is_rms_norm(mlp.ffn_sub_norm, True)
            eps = {block.input_layernorm.eps, block.post_attention_layernorm.eps}
            eps |= {n.eps for n in (attn.attn_sub_norm, mlp.ffn_sub_norm) if n is not None}
            if not (norms_ok and subs_ok and eps == {config.rms_norm_eps}):
                return None
        return isa

    @classmethod
    def for_model(cls, model: nn.Module) -> NativeDecoder | None:
        """The model's native decoder (made once, remade when its weights change), or None.

        The full check of what the plan reads (is_current) touches ~1000 Python objects, which a decode step's
        weight streaming has evicted from the caches: ~0.4 ms. It runs only after some module, parameter or
        buffer was registered anywhere (the hooks below count those) or when the first layer's norm weight has
        moved (as `.to()` moves everything); otherwise a forward costs two comparisons."""
        cached = model.__dict__.get("_native_decoder")
        if cached is not None and cached[1] == _edits[0]:
            dec = cached[0]
            if dec is None or dec._probe.data_ptr() == dec._probe_ptr:
                return dec
        dec = cached[0] if cached is not None else None
        if dec is None or not dec.is_current():
            isa = cls.supports(model)
            dec = None if isa is None else cls(model, isa)
            if dec is not None and not model.__dict__.get("_native_decoder_hooked"):
                # load_state_dict copies into the tensors in place: the plan's float32 norm copies go stale
                model.register_load_state_dict_post_hook(_forget_plan)
                model.__dict__["_native_decoder_hooked"] = True
        model.__dict__["_native_decoder"] = (dec, _edits[0])
        return dec

    def fits(self, x: torch.Tensor, cache) -> bool:
        """Whether a forward of x [B, T, hidden] over `cache` (a KVCache or a view of one; float32 or
        bfloat16) can run here."""
        k, v = getattr(cache, "k", None), getattr(cache, "v", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 5):
            return False
        layers, batch, kvh, _, d = k.shape
        return (
            x.device.type == k.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.shape[1] >= 1
            and k.dtype == v.dtype
            and cpu.kv_type(k.dtype) is not None
            and k.shape == v.shape
            and k.stride() == v.stride()
            and layers == self.config.num_hidden_layers
            and batch >= x.shape[0]
            and kvh == self.kv_heads
            and d == self.head_dim
            and k.stride(4) == 1
            and k.stride(3) == d
        )

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache,
        reuse_input: bool = False,
    ) -> torch.Tensor:
        """x [B, T, hidden] (any float dtype) through every layer; returns float32 [B, T, hidden]. Writes the
        new tokens' keys and values into the cache at `positions` [B, T]. `reuse_input`: the caller gives x
        up, so a float32 contiguous x is updated in place rather than copied (one activation buffer less)."""
        cpu._ensure_threads()
        b, t, _ = x.shape
        h = x.to(torch.float32).contiguous()
        if h.data_ptr() == x.data_ptr() and not reuse_input:
            h = h.clone()  # updated in place: never the caller's tensor
        pos = positions.to(torch.int64).expand(b, t).contiguous()  # the C code checks 0 <= pos < keys
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
        for t0 in range(0, t, CHUNK):  # later chunks attend to earlier ones through the cache
            part = slice(t0, min(t, t0 + CHUNK))
            if part == slice(0, t) or b == 1:
                self._run(h[:, part], pos[:, part], cos[:, part], sin[:, part], cache)
            else:
                hc = h[:, part].contiguous()
                self._run(
                    hc, pos[:, part].contiguous(), cos[:, part].contiguous(), sin[:, part].contiguous(), cache
                )
                h[:, part] = hc
        return h

    def _run(self, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> None:
        """One native call on contiguous [B, T', ...] tensors; h is updated in place."""
        k, v = cache.k, cache.v
        cpu._native.decoder_run(
            self._handle,
            self.isa,
            h.data_ptr(),
            h.shape[0],
            h.shape[1],
            pos.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            k.shape[3],
            cpu.kv_type(k.dtype),
        )
