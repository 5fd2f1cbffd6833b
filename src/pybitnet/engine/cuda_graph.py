"""The CUDA engine path: a Transformer's weights regrouped for the Triton kernels, a static KV cache, and the
decode step captured once per batch size in a CUDA graph (sampling included), so a decode step is one replay.

`GpuForward` holds the fused weights (q/k/v stacked, gate/up stacked, per-row scales) packed once in the
"triton_i2" layout, and runs prefill and decode with fused kernels: at batch 1 every projection is one launch
(RMSNorm + int8 quantization + W2A8 GEMV + epilogue); at larger batches a norm + quantize launch feeds the
tensor-core GEMM. With `norm_in_producer`, batch 1 instead normalizes and quantizes each projection's input
once, in the last program of the GEMV that produces the row; with `layer_kernel`, batch 1 runs each decoder
layer as one persistent launch (decode_layer.py: the same per-tile code, phases separated by grid barriers;
measured slower on an H200, so off by default).
`weights="ternary_int8"` also keeps every projection's codes expanded to int8 (1.25 bytes a weight in all,
bf16's 2): products of more than one row (batched decode, prefill) then run on int8 tensor cores with no 2-bit
decoding or expansion per call, while one row still reads the 2-bit weights; "ternary" keeps the 2-bit weights
alone; "auto" (the default) keeps the int8 codes when they take at most a quarter of the GPU's free memory.
`weights="bf16"` runs the same engine on dequantized bf16 weights through cuBLAS (the baseline the benchmarks
compare against). `CudaGraphEngine.generate` decodes many sequences with no host round trip per token;
`CudaGraphRunner` offers the same graphs behind the engine's ModelRunner interface.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import ContextLengthError, InvalidRequestError, UnsupportedModelError
from ..kernels.triton.argmax import argmax_rows, greedy_advance
from ..kernels.triton.attention import decode_attention
from ..kernels.triton.decode_layer import decode_layer
from ..kernels.triton.embedding import embedding
from ..kernels.triton.expanded import int8_codes
from ..kernels.triton.matmul import MMConfig, default_config, int8_weight, ternary_gemv, ternary_mm
from ..kernels.triton.quant import norm_quant
from ..models import KVCache, Transformer
from ..models.transformer import apply_rope
from ..quant import PackedWeight, TernaryWeight, pack
from .runner import ModelRunner
from .sampler import keep_prefix

Weight = PackedWeight | torch.Tensor  # ternary ("triton_i2") or a dense [out, in] matrix


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: Weight
    attn_norm: torch.Tensor | None
    o: Weight
    ln2: torch.Tensor
    gate_up: Weight
    ffn_norm: torch.Tensor | None
    down: Weight
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # projection -> its int8 codes, if kept

    def gains_and_weights(self) -> tuple:
        """(ln1, qkv, attn_norm, o, ln2, gate_up, ffn_norm, down), as `decode_layer` takes them."""
        return (self.ln1, self.qkv, self.attn_norm, self.o, self.ln2, self.gate_up, self.ffn_norm, self.down)


def _ternary(module: torch.nn.Module) -> TernaryWeight:
    if getattr(module, "bias", None) is not None or getattr(module, "input_norm", None) is not None:
        raise UnsupportedModelError("the CUDA engine supports ternary linears without bias or input norm")
    return module.ternary()


def _stack(modules: list[torch.nn.Module]) -> TernaryWeight:
    """Ternary weights of several linears with one input, stacked by rows, each row keeping its own scale."""
    parts = [_ternary(m) for m in modules]
    codes = torch.cat([p.codes for p in parts])
    scale = torch.cat([p.scale.float().reshape(-1).expand(p.codes.shape[0]) for p in parts])
    return TernaryWeight(codes, scale)


WEIGHTS = ("auto", "ternary", "ternary_int8", "bf16")
# "auto" keeps int8 codes when they need at most this share of the free GPU memory
CODES_MEMORY_SHARE = 0.25
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the _Layer fields holding a projection's weight


class GpuForward:
    """Prefill and decode forward passes of a Transformer on the GPU kernels (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        weights: str = "auto",
        lm_head: str = "int8",
        decode_gemv: bool = True,
        max_len: int | None = None,
        fuse_norm: bool = True,
        norm_in_producer: bool = False,
        layer_kernel: bool = False,
    ) -> None:
        if weights not in WEIGHTS:
            raise InvalidRequestError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        if lm_head not in ("int8", "float"):
            raise InvalidRequestError(f"lm_head must be 'int8' or 'float', got {lm_head!r}")
        c = model.config
        self.config = c
        self.device = model.device
        self.dtype = model.compute_dtype
        self.dense = weights == "bf16"
        self.decode_gemv = decode_gemv
        self.fuse_norm = fuse_norm
        self.norm_in_producer = norm_in_producer
        self.layer_kernel = layer_kernel
        self.act = c.hidden_act
        self.eps = c.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.max_len = max_len or c.max_position_embeddings
        self.configs: dict[tuple[str, int], MMConfig] = {}  # (projection, rows) -> tiles; defaults by shape
        with torch.no_grad():
            self.embed = model.embed_tokens.weight.detach().to(self.dtype)
            self.norm = model.norm.weight.detach().to(self.dtype)
            self.layers = [self._layer(block) for block in model.layers]
            self._keep_codes(weights)
            head = model.lm_head.weight.detach()
            self.lm_int8 = int8_weight(head) if lm_head == "int8" else None
            self.lm_weight = None if self.lm_int8 is not None else head
            cos, sin = model.rope(torch.arange(self.max_len, device=self.device)[None])
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        # the arrival counters of the one-launch layers' barriers (decode_layer.py), one per layer
        self.barriers = torch.zeros(len(self.layers), dtype=torch.int64, device=self.device)

    def _weight(self, tw: TernaryWeight) -> Weight:
        if self.dense:
            return tw.dequantize(torch.bfloat16 if self.dtype == torch.bfloat16 else self.dtype).to(
                self.device
            )
        pw = pack(tw, "triton_i2")
        return PackedWeight(pw.layout, pw.data.to(self.device), pw.scale.to(self.device), pw.shape)

    def _layer(self, block: torch.nn.Module) -> _Layer:
        attn, mlp = block.self_attn, block.mlp

        def gain(norm: torch.nn.Module | None) -> torch.Tensor | None:
            return None if norm is None else norm.weight.detach().to(self.dtype)

        return _Layer(
            ln1=gain(block.input_layernorm),
            qkv=self._weight(_stack([attn.q_proj, attn.k_proj, attn.v_proj])),
            attn_norm=gain(attn.attn_sub_norm),
            o=self._weight(_stack([attn.o_proj])),
            ln2=gain(block.post_attention_layernorm),
            gate_up=self._weight(_stack([mlp.gate_proj, mlp.up_proj])),
            ffn_norm=gain(mlp.ffn_sub_norm),
            down=self._weight(_stack([mlp.down_proj])),
        )

    def _keep_codes(self, weights: str) -> None:
        """Expand every projection's codes to int8 once, for `weights` "ternary_int8", or for "auto" when they
        fit CODES_MEMORY_SHARE of the GPU's free memory (one byte a weight)."""
        if weights in ("bf16", "ternary"):
            return
        if weights == "auto":
            if self.device.type != "cuda":
                return
            nbytes = sum(math.prod(getattr(layer, n).shape) for layer in self.layers for n in PROJECTIONS)
            if nbytes > CODES_MEMORY_SHARE * torch.cuda.mem_get_info(self.device)[0]:
                return
        for layer in self.layers:
            layer.codes = {
                name: int8_codes(getattr(layer, name), gated=name == "gate_up") for name in PROJECTIONS
            }

    # ---- projections ----

    def _project(
        self,
        name: str,
        x: torch.Tensor,
        gain: torch.Tensor | None,
        layer: _Layer,
        residual: torch.Tensor | None = None,
        act: str | None = None,
    ) -> torch.Tensor:
        """residual + [act-gated] (norm(x) @ W.T) for the layer's projection `name`, through the ternary
        kernels (on its kept int8 codes, if any, for more than one row)."""
        w, codes = getattr(layer, name), layer.codes.get(name)
        rows = x.shape[0]
        cfg = self.configs.get((name, rows))
        # a residual is the sub-block's input: the projection and attention (or gate/up) that turned it
        # into x ran in between, so it was written two launches or more before the GEMV
        gemv = dict(residual=residual, act=act, config=cfg, residual_early=True)
        if rows == 1 and self.decode_gemv and self.fuse_norm:
            return ternary_gemv(x, w, gain=gain, eps=self.eps, **gemv)
        xq, a, _ = norm_quant(x, gain, self.eps)
        if rows == 1 and self.decode_gemv:
            return ternary_gemv(xq, w, a=a, out_dtype=x.dtype, **gemv)
        if codes is not None:  # `configs` holds 2-bit kernel tiles: the int8 product picks its own
            return ternary_mm(xq, a, w, x.dtype, residual=residual, act=act, codes=codes)
        return ternary_mm(xq, a, w, x.dtype, residual=residual, act=act, config=cfg)

    def _dense_norm(self, x: torch.Tensor, gain: torch.Tensor | None, act: str | None = None) -> torch.Tensor:
        if gain is None and act is None:
            return x
        return norm_quant(x, gain, self.eps, act=act, quant=False, store_float=True)[2]

    def _attention_in(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        if self.dense:
            return self._dense_norm(x, layer.ln1) @ layer.qkv.T
        return self._project("qkv", x, layer.ln1, layer)

    def _attention_out(self, attn: torch.Tensor, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        if self.dense:
            return torch.addmm(x, self._dense_norm(attn, layer.attn_norm), layer.o.T)
        return self._project("o", attn, layer.attn_norm, layer, residual=x)

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        if self.dense:
            gate_up = self._dense_norm(x, layer.ln2) @ layer.gate_up.T
            return torch.addmm(x, self._dense_norm(gate_up, layer.ffn_norm, act=self.act), layer.down.T)
        h = self._project("gate_up", x, layer.ln2, layer, act=self.act)
        return self._project("down", h, layer.ffn_norm, layer, residual=x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on hidden states [B, H] -> float32 logits [B, V]."""
        if self.lm_int8 is not None:
            xq, a, _ = norm_quant(x, self.norm, self.eps)
            return self._int8_logits(xq, a)
        xn = self._dense_norm(x, self.norm)
        return (xn.to(self.lm_weight.dtype) @ self.lm_weight.T).float()

    def _int8_logits(self, xq: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The int8 head on final-normed rows already quantized (xq int8 [B, H], scales a [B])."""
        cfg = self.configs.get(("lm_head", xq.shape[0]))
        return ternary_mm(xq, a, self.lm_int8, torch.float32, config=cfg)

    # ---- passes ----

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row: tokens [B] at positions [B] (int32), rows 0..B-1 of `cache` -> logits [B, V]."""
        x = embedding(tokens, self.embed)
        one_row = x.shape[0] == 1 and self.decode_gemv and not self.dense
        if self.layer_kernel and one_row and self.fuse_norm:
            for i, layer in enumerate(self.layers):
                x = decode_layer(
                    x, layer.gains_and_weights(), self.cos, self.sin, positions, cache.k[i], cache.v[i],
                    self.n_heads, self.n_kv, self.eps, self.act, self.barriers[i : i + 1],
                )  # fmt: skip
            return self.logits(x)
        if self.norm_in_producer and one_row:
            return self._decode_quant_chain(x, positions, cache)
        for i, layer in enumerate(self.layers):
            qkv = self._attention_in(x, layer)
            attn = decode_attention(
                qkv, self.cos, self.sin, positions, cache.k[i], cache.v[i], self.n_heads, self.n_kv
            )
            x = self._attention_out(attn, x, layer)
            x = self._mlp(x, layer)
        return self.logits(x)

    def _gemv(self, name: str, x: torch.Tensor, w: PackedWeight, next_gain: torch.Tensor | None, **kw):
        """One-row projection whose last program also normalizes (next_gain) and quantizes the output row for
        the next projection: (output row, its int8 row, its scale)."""
        n = w.shape[0] // 2 if kw.get("act") else w.shape[0]
        q = torch.empty((1, n), dtype=torch.int8, device=x.device)
        a = torch.empty((1,), dtype=torch.float32, device=x.device)
        cfg = self.configs.get((name, 1)) or default_config(1, n, w.shape[1], gated=kw.get("act") is not None)
        # the arrival count covers one program per output tile, of the tile-per-program kernel
        cfg = replace(cfg, split_k=1, resident=0, bk=2048 if cfg.resident else cfg.bk)
        y = ternary_gemv(x, w, eps=self.eps, config=cfg, then_quant=(next_gain, q, a), **kw)
        return y, q, a

    def _decode_quant_chain(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Decode at batch 1 with each input norm + quantization done once, by the projection producing the
        row (the last program of its GEMV), instead of by every program of the GEMV that reads it; the
        attention output is still normalized inside the o projection."""
        xq, xa, _ = norm_quant(x, self.layers[0].ln1, self.eps)
        dt = x.dtype
        for i, layer in enumerate(self.layers):
            qkv = ternary_gemv(xq, layer.qkv, a=xa, out_dtype=dt, config=self.configs.get(("qkv", 1)))
            attn = decode_attention(
                qkv, self.cos, self.sin, positions, cache.k[i], cache.v[i], self.n_heads, self.n_kv
            )
            h, hq, ha = self._gemv("o", attn, layer.o, layer.ln2, gain=layer.attn_norm, residual=x)
            _, mq, ma = self._gemv(
                "gate_up", hq, layer.gate_up, layer.ffn_norm, a=ha, out_dtype=dt, act=self.act
            )
            last = i + 1 == len(self.layers)
            nxt = self.norm if last else self.layers[i + 1].ln1
            x, xq, xa = self._gemv("down", mq, layer.down, nxt, a=ma, out_dtype=dt, residual=h)
        if self.lm_int8 is not None:  # xq, xa: the final norm of x, quantized
            return self._int8_logits(xq, xa)
        return self.logits(x)

    def prefill(
        self,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        cache: KVCache,
        row0: int = 0,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompts ids [B, T] (right-padded, real lengths [B]) into cache rows row0.. (or the rows listed in
        `rows`, a device tensor [B], which a captured prefill can change between replays) -> logits [B, V]
        after each prompt's last token."""
        b, t = ids.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        x = embedding(ids.reshape(-1), self.embed)
        cos, sin = self.cos[:t].expand(b, t, d), self.sin[:t].expand(b, t, d)
        for i, layer in enumerate(self.layers):
            qkv = self._attention_in(x, layer).view(b, t, h + 2 * kv, d).transpose(1, 2)
            q, k, v = qkv.split([h, kv, kv], dim=1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if rows is None:
                cache.k[i, row0 : row0 + b, :, :t] = k
                cache.v[i, row0 : row0 + b, :, :t] = v
            else:
                cache.k[i, :, :, :t].index_copy_(0, rows, k)
                cache.v[i, :, :, :t].index_copy_(0, rows, v)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = self._attention_out(attn.transpose(1, 2).reshape(b * t, h * d), x, layer)
            x = self._mlp(x, layer)
        last = x.view(b, t, -1)[torch.arange(b, device=ids.device), lengths - 1]
        return self.logits(last)


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Token ids [B] from logits [B, V] with per-row temperature (0: greedy), top-k (>= V: off), top-p,
    without host synchronization (so it can be captured in a CUDA graph): argmax(p / E), E ~ Exp(1)."""
    greedy = argmax_rows(logits)
    probs = torch.softmax(logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    probs = keep_prefix(probs, *probs.sort(dim=-1, descending=True), top_k, top_p)
    sampled = argmax_rows(probs / torch.empty_like(probs).exponential_())
    return torch.where(temperature <= 0, greedy, sampled)


# A captured prefill runs prompts padded to a multiple of this many tokens: one graph per (batch, padded
# length) instead of one per exact length; the padding costs at most this many positions of work.
PREFILL_BUCKET = 256


def _bucket(t: int, max_len: int) -> int:
    """The padded length of a captured prefill of t tokens."""
    return min(-(-t // PREFILL_BUCKET) * PREFILL_BUCKET, max_len)


class _PrefillGraph:
    """The prefill of `n` prompts right-padded to `t` tokens into cache rows `rows`, captured once: replaying
    it launches the ~15 kernels of each layer without Python in between (a 2048-token prefill of a 2B-4T
    model issues ~450 launches, whose host-side cost otherwise rivals the GPU work). The rows are an input
    of the graph too; the warm-up and the capture write the first call's rows (which that call overwrites)."""

    def __init__(self, forward: GpuForward, cache: KVCache, capture, rows: torch.Tensor, t: int) -> None:
        n = rows.numel()
        self.ids = torch.zeros((n, t), dtype=torch.long, device=rows.device)
        self.lengths = torch.ones(n, dtype=torch.long, device=rows.device)
        self.rows = rows.clone()
        self.logits: torch.Tensor | None = None

        def step() -> None:
            self.logits = forward.prefill(self.ids, self.lengths, cache, rows=self.rows)

        self.graph = capture(step)

    def run(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.ids.zero_()
        self.ids[:, : ids.shape[1]].copy_(ids)
        self.lengths.copy_(lengths)
        self.rows.copy_(rows)
        self.graph.replay()
        assert self.logits is not None
        return self.logits.clone()


class _DecodeLoop:
    """Static buffers of a decode step for `n` rows; the step feeds each sampled token back as next input.
    With graphs, one of a single step and one of `steps` steps in a row: inside a graph each step's first
    kernel starts under the previous step's last one (dependent launch), between replays it waits for the
    replay's end and its launch."""

    def __init__(self, engine: CudaGraphEngine, n: int, sampling: bool, steps: int) -> None:
        dev = engine.device
        self.engine, self.n, self.sampling = engine, n, sampling
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int32, device=dev)
        self.history = torch.zeros((n, engine.max_len), dtype=torch.long, device=dev)
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(n, device=dev)
        self.top_k = torch.zeros(n, dtype=torch.long, device=dev)
        self.top_p = torch.ones(n, device=dev)
        self.steps = min(steps, engine.max_len)
        self.graphs = {k: self._capture(k) for k in {1, self.steps}} if engine.use_graph else None

    def _capture(self, k: int) -> torch.cuda.CUDAGraph:
        """A graph of k steps. Capturing warms up by running them once on these buffers (so it happens before
        any prefill), from position and step 0: the k positions and history entries written stay in range."""
        self.positions.zero_()
        self.step_index.zero_()
        return self.engine.graphs.capture(functools.partial(self._steps, k))

    def step(self) -> None:
        logits = self.engine.forward.decode(self.tokens, self.positions, self.engine.cache)
        if not self.sampling:  # argmax, history, positions and step index in one launch
            greedy_advance(logits, self.tokens, self.history, self.step_index, self.positions)
            return
        nxt = sample_tokens(logits, self.temperature, self.top_k, self.top_p)
        self.history.scatter_(1, self.step_index.expand(self.n)[:, None], nxt[:, None])
        self.tokens.copy_(nxt)
        self.positions.add_(1)
        self.step_index.add_(1)

    def _steps(self, k: int) -> None:
        for _ in range(k):
            self.step()

    def run(self, steps: int = 1) -> None:
        """`steps` decode steps: 1 or self.steps."""
        if self.graphs is not None:
            self.graphs[steps].replay()
        else:
            self._steps(steps)


class CudaGraphEngine:
    """Batched generation on one GPU: prefill, then decode steps replayed from a CUDA graph.

    `generate` takes up to `max_batch_size` prompts of token ids and returns each one's new tokens (up to and
    including a stop token). `weights`, `lm_head`, `decode_gemv`, `fuse_norm`, `norm_in_producer`,
    `layer_kernel`: see GpuForward.
    `use_graph=False` runs the same step eagerly (for debugging, and on CPU under TRITON_INTERPRET=1).
    `prefill_graph` (default) also replays prefills from CUDA graphs, one per batch size and prompt length
    rounded up to PREFILL_BUCKET (see `prefill`): a 2048-token prefill of the 2B-4T shape launches ~450
    kernels, which Python issues slower than an H200 runs them (eager: 24-45 ms, captured: 19.5 ms). The first
    prompt of each new (batch, bucket) pays for its capture.
    `decode_steps`: decode steps a graph replay runs while at least that many tokens remain (one at a time for
    the rest); on an H200 four in a row take 661.1 µs a step of the 2B-4T shape at batch 1 against 662.8 for
    one a replay (benchmarks/gpu_decode_timeline.py --step-only [--decode-steps 1]): the gap between
    replays. Stop tokens
    are looked for every `check_every` tokens either way.
    """

    def __init__(
        self,
        model: Transformer,
        max_batch_size: int = 1,
        max_len: int | None = None,
        weights: str = "auto",
        lm_head: str = "int8",
        decode_gemv: bool = True,
        use_graph: bool = True,
        fuse_norm: bool = True,
        norm_in_producer: bool = False,
        prefill_graph: bool = True,
        layer_kernel: bool = False,
        decode_steps: int = 4,
    ) -> None:
        if decode_steps < 1:
            raise InvalidRequestError(f"decode_steps must be at least 1, got {decode_steps}")
        c = model.config
        self.decode_steps = decode_steps
        self.max_len = max_len or c.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.device = model.device
        self.use_graph = use_graph and self.device.type == "cuda"
        self.prefill_graph = prefill_graph and self.use_graph
        self.forward = GpuForward(
            model, weights, lm_head, decode_gemv, self.max_len, fuse_norm, norm_in_producer, layer_kernel
        )
        self.cache = KVCache(
            c.num_hidden_layers, max_batch_size, c.num_key_value_heads, self.max_len, c.head_dim,
            self.forward.dtype, self.device,
        )  # fmt: skip
        self._loops: dict[tuple[int, bool], _DecodeLoop] = {}
        self._prefills: dict[tuple[int, int], _PrefillGraph] = {}
        self.graphs = GraphPool(self.device)

    def _loop(self, n: int, sampling: bool) -> _DecodeLoop:
        key = (n, sampling)
        if key not in self._loops:
            self._loops[key] = _DecodeLoop(self, n, sampling, self.decode_steps)
        return self._loops[key]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill prompts into cache rows 0..len-1; their next-token logits [B, V]. With `prefill_graph`, the
        prompts run padded to a multiple of PREFILL_BUCKET tokens (at most max_len) in a graph captured for
        that batch and length; positions past a prompt's end get cache entries that decoding overwrites
        before it reads them."""
        lengths = [len(p) for p in prompts]
        t = max(lengths)
        if t > self.max_len:
            raise ContextLengthError(f"a prompt of {t} tokens does not fit the engine's {self.max_len}")
        ids = torch.zeros((len(prompts), t), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        ids, lens = ids.to(self.device), torch.tensor(lengths).to(self.device)
        if not self.prefill_graph:
            return self.forward.prefill(ids, lens, self.cache)
        key = (len(prompts), _bucket(t, self.max_len))
        rows = torch.arange(len(prompts), device=self.device)
        if key not in self._prefills:
            self._prefills[key] = _PrefillGraph(self.forward, self.cache, self.graphs.capture, rows, key[1])
        return self._prefills[key].run(ids, lens, rows)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: tuple[int, ...] = (),
        check_every: int = 32,
    ) -> list[list[int]]:
        n = len(prompts)
        if not 1 <= n <= self.max_batch_size:
            raise InvalidRequestError(f"between 1 and {self.max_batch_size} prompts per call, got {n}")
        if any(len(p) == 0 for p in prompts):
            raise InvalidRequestError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_len:
            raise ContextLengthError(
                f"prompt plus {max_new_tokens} new tokens needs {longest} positions; "
                f"the engine has {self.max_len}"
            )
        sampling = temperature > 0
        loop = self._loop(n, sampling)
        if sampling:
            loop.temperature.fill_(temperature)
            loop.top_k.fill_(top_k if top_k > 0 else self.forward.embed.shape[0])
            loop.top_p.fill_(top_p)
        logits = self.prefill(prompts)
        first = (
            sample_tokens(logits, loop.temperature, loop.top_k, loop.top_p)
            if sampling
            else logits.argmax(dim=-1)
        )
        loop.tokens.copy_(first)
        loop.history[:, 0] = first
        loop.positions.copy_(torch.tensor([len(p) for p in prompts], dtype=torch.int32))
        loop.step_index.fill_(1)
        stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=self.device)
        done = checked = 1
        while done < max_new_tokens:
            k = loop.steps if max_new_tokens - done >= loop.steps else 1
            loop.run(k)
            done += k
            if stops.numel() and done - checked >= check_every:
                checked = done
                if self._all_stopped(loop.history[:, :done], stops):
                    break
        return [self._trim(row, set(stop_token_ids)) for row in loop.history[:, :done].tolist()]

    @staticmethod
    def _all_stopped(history: torch.Tensor, stops: torch.Tensor) -> bool:
        return bool(torch.isin(history, stops).any(dim=1).all())

    @staticmethod
    def _trim(row: list[int], stops: set[int]) -> list[int]:
        for i, tok in enumerate(row):
            if tok in stops:
                return row[: i + 1]
        return row


class CudaGraphRunner(ModelRunner):
    """The engine's ModelRunner interface (reserve / prefill(slot, ids) / decode(tokens, positions)) on the
    GPU kernels, each decode batch size captured once in a CUDA graph."""

    def __init__(self, model: Transformer, max_model_len: int, prefill_graph: bool = True, **kwargs) -> None:
        super().__init__(model, max_model_len)
        self.forward = GpuForward(model, max_len=max_model_len, **kwargs)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # prefill_graph: prefills replayed from a graph per prompt length rounded up to PREFILL_BUCKET, into
        # the slot given at replay (see CudaGraphEngine). A 16-token prompt of the 2B-4T shape on an H200:
        # 17.4 ms eager (host-bound launches), 4.7 ms replayed; the first prompt of each bucket captures.
        self.prefill_graph = prefill_graph
        self._prefills: dict[int, _PrefillGraph] = {}
        self.graphs = GraphPool(self.device)

    def new_cache(self, slots: int) -> KVCache:
        c = self.model.config
        return KVCache(
            c.num_hidden_layers, slots, c.num_key_value_heads, self.max_model_len, c.head_dim,
            self.forward.dtype, self.device,
        )  # fmt: skip

    def reserve(self, slots: int) -> None:
        super().reserve(slots)
        self._graphs.clear()  # graphs point into the old cache
        self._prefills.clear()

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        assert self.cache is not None and slot < self.num_slots
        input_ids = torch.tensor([ids], device=self.device)
        lengths = torch.tensor([len(ids)], device=self.device)
        if not self.prefill_graph:
            return self.forward.prefill(input_ids, lengths, self.cache, row0=slot)[0]
        t = _bucket(len(ids), self.max_model_len)
        rows = torch.tensor([slot], device=self.device)
        if t not in self._prefills:
            self._prefills[t] = _PrefillGraph(self.forward, self.cache, self.graphs.capture, rows, t)
        return self._prefills[t].run(input_ids, lengths, rows)[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        assert self.cache is not None and len(tokens) <= self.num_slots
        n = len(tokens)
        tok = torch.tensor(tokens).to(self.device)
        pos = torch.tensor(positions, dtype=torch.int32).to(self.device)
        if n not in self._graphs:
            self._graphs[n] = self._capture(tok, pos)
        graph, tok_buf, pos_buf, out = self._graphs[n]
        tok_buf.copy_(tok)
        pos_buf.copy_(pos)
        graph.replay()
        return out.clone()

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor):
        # the warm-up run computes the real step (it writes the cache), so the buffers hold the real inputs
        tok_buf, pos_buf = tokens.clone(), positions.clone()
        out = torch.empty((len(tokens), self.model.config.vocab_size), device=self.device)

        def step() -> None:
            out.copy_(self.forward.decode(tok_buf, pos_buf, self.cache))

        return self.graphs.capture(step), tok_buf, pos_buf, out


class GraphPool:
    """CUDA graphs of one device captured into one memory pool: the engine replays them one at a time, so
    they can share their intermediate buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = None

    def capture(self, step) -> torch.cuda.CUDAGraph:
        """Warm `step` up on a side stream (Triton compiles there), then capture it in a graph of the pool."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        self.pool = graph.pool()
        return graph
