"""The decoder layers in one C call (kernels.cpu_decoder) against the model's torch code on the same kernels
(bit for bit: the same float32 math in the same order) and against the reference kernel (to rounding)."""

from __future__ import annotations

import pytest
import torch

from pybitnet.kernels import cpu
from pybitnet.kernels.cpu_decoder import NativeDecoder
from pybitnet.models.config import ModelConfig
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model

pytestmark = pytest.mark.skipif(not cpu.native_available(), reason="the C kernels are not built")

PATHS = [name for name in ("scalar", "avx2", "avx512vnni", "neondot") if cpu.isa_available(name)]
CACHE_DTYPES = [torch.float32, torch.bfloat16]
# sizes that are not multiples of the kernels' 4 rows / 128 columns, GQA groups of 3, both families
ODD = dict(vocab_size=301, hidden_size=200, intermediate_size=333, num_hidden_layers=2)
CONFIGS = {
    "bitnet": preset("tiny-bitnet"),
    "bitnet-odd": ModelConfig(
        family="bitnet", num_attention_heads=6, num_key_value_heads=2, head_dim=18, hidden_act="relu2", **ODD
    ),
    "llama-odd": ModelConfig(
        family="llama", num_attention_heads=3, num_key_value_heads=1, head_dim=34, hidden_act="silu", **ODD
    ),
}


def _decode(
    model, ids: torch.Tensor, prompt: int, native: bool, monkeypatch, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, object]:
    """Logits of a prompt forward then one-token steps, on the native decoder or the torch layers."""
    with monkeypatch.context() as m:
        if not native:
            m.setattr(NativeDecoder, "fits", lambda self, x, cache: False)
        b, t = ids.shape
        cache = model.new_cache(b, t + 3, dtype=dtype)
        offsets = torch.arange(b)[:, None]  # rows at different positions, as batched decode has them
        out = [model(ids[:, :prompt], torch.arange(prompt) + offsets, cache)]
        out += [model(ids[:, i : i + 1], torch.full((b, 1), i) + offsets, cache) for i in range(prompt, t)]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("isa", PATHS)
def test_native_decoder_matches_torch_layers(name, isa, dtype, monkeypatch):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=1, kernel=f"cpu-{isa}")
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, got_cache = _decode(model, ids, 3, True, monkeypatch, dtype)
        assert isinstance(NativeDecoder.for_model(model), NativeDecoder)
        want, want_cache = _decode(model, ids, 3, False, monkeypatch, dtype)
    assert got_cache.k.dtype == want_cache.k.dtype == dtype
    if cfg.hidden_act == "relu2":  # every op is the torch op's float32 math: identical
        assert torch.equal(got, want)
        assert torch.equal(got_cache.k, want_cache.k) and torch.equal(got_cache.v, want_cache.v)
    else:  # SiLU: libm's expf against torch's vectorized exp, a few ulp apart
        scale = want.abs().max().item()
        assert torch.allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_every_isa_gives_the_same_logits():
    cfg = CONFIGS["bitnet-odd"]
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    outs = []
    for isa in PATHS:
        model = random_model(cfg, seed=2, kernel=f"cpu-{isa}")
        with torch.inference_mode():
            cache = model.new_cache(1, 8)
            outs.append(model(ids, torch.arange(6)[None], cache))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("isa", PATHS)
def test_bf16_cache_holds_torch_rounding(isa, monkeypatch):
    """A prompt longer than the torch layers' C attention takes (so they write the cache with torch ops):
    the first layer's keys and values, computed from the same inputs, round to bfloat16 as torch rounds."""
    cfg = CONFIGS["bitnet-odd"]
    model = random_model(cfg, seed=6, kernel=f"cpu-{isa}")
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        _, f32 = _decode(model, ids, 7, True, monkeypatch, torch.float32)
        _, native = _decode(model, ids, 7, True, monkeypatch, torch.bfloat16)
        _, torch_layers = _decode(model, ids, 7, False, monkeypatch, torch.bfloat16)
    for cache in (native, torch_layers):
        assert torch.equal(cache.k[0], f32.k[0].to(torch.bfloat16))
        assert torch.equal(cache.v[0], f32.v[0].to(torch.bfloat16))


def test_bf16_prompt_attention_matches_one_token_steps():
    """A prompt's attention widens the bfloat16 rows once per thread; a decode step reads them as they are:
    the same numbers either way."""
    heads, kv_heads, d, keys, t = 6, 2, 40, 37, 5
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, t, (heads + 2 * kv_heads) * d, generator=g)
    cos, sin = torch.randn(2, t, d, generator=g), torch.randn(2, t, d, generator=g)
    positions = torch.arange(t) + torch.tensor([[20], [31]])
    cache = torch.randn(2, 2, kv_heads, keys, d, generator=g).to(torch.bfloat16)

    def attend(rows: slice, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv[:, rows].contiguous().split([heads * d, kv_heads * d, kv_heads * d], -1)
        return cpu.decode_attention(
            q, k, v, cos[:, rows], sin[:, rows], cache_k, cache_v, positions[:, rows], heads, d**-0.5
        )

    prompt_cache, step_cache = cache.clone(), cache.clone()
    prompt = attend(slice(0, t), *prompt_cache)
    steps = torch.cat([attend(slice(i, i + 1), *step_cache) for i in range(t)], 1)
    assert torch.equal(prompt, steps) and torch.equal(prompt_cache, step_cache)


# The reference (float32 attention, no cache) against the native decoder: float rounding only with a float32
# cache; a bfloat16 cache adds its rounding of keys and values, which the int8 quantization of every layer's
# input then amplifies (a value that moves across a rounding boundary of the int8 grid moves by a whole step).
# (largest error / largest logit, mean error / mean logit); measured: ~5e-7 and ~2e-7, ~1.4e-2 and ~1.7e-2.
REFERENCE_TOLERANCE = {torch.float32: (2e-3, 1e-3), torch.bfloat16: (4e-2, 4e-2)}


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("name", ["bitnet", "llama-odd"])
def test_native_decoder_matches_reference_model(name, dtype):
    """The reference kernel (torch, integer-exact) with torch attention defines truth; the native decoder
    differs by float rounding only (norm sums, softmax, the cache's dtype), with the float head for both."""
    cfg = CONFIGS[name]
    ref, nat = random_model(cfg, seed=3, kernel="reference"), random_model(cfg, seed=3, kernel="cpu")
    nat.head_mode = "float"
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(ids)
        cache = nat.new_cache(2, 12, dtype=dtype)
        steps = [nat(ids[:, :6], torch.arange(6).expand(2, -1), cache)]
        steps += [nat(ids[:, i : i + 1], torch.full((2, 1), i), cache) for i in range(6, 10)]
    got = torch.cat(steps, 1)
    worst, mean = REFERENCE_TOLERANCE[dtype]
    err = (got - want).abs()
    assert err.max() <= worst * want.abs().max() and err.mean() <= mean * want.abs().mean()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_native_models_default_to_a_bf16_cache():
    cfg = CONFIGS["bitnet"]
    ref = random_model(cfg, seed=5, kernel="reference")
    nat = random_model(cfg, seed=5, kernel="cpu", dtype=torch.bfloat16)
    assert ref.new_cache(1, 8).k.dtype == torch.float32  # the torch layers: the compute dtype
    assert random_model(cfg, seed=5, kernel="cpu").new_cache(1, 8).k.dtype == torch.bfloat16
    nat.head_mode = "float"
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache = nat.new_cache(1, 8)
        assert cache.k.dtype == torch.bfloat16 and NativeDecoder.for_model(nat).fits(ids[..., None], cache)
        got = nat(ids, torch.arange(8)[None], cache)
        want = ref(ids)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85  # bf16 embeddings and head vs float32


def test_plan_follows_weight_changes():
    cfg = CONFIGS["bitnet"]
    model = random_model(cfg, seed=4, kernel="cpu")
    ids = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = model(ids, torch.arange(4)[None], model.new_cache(1, 4))
        first = NativeDecoder.for_model(model)
        assert NativeDecoder.for_model(model) is first
        norm = model.layers[1].post_attention_layernorm
        norm.weight = torch.nn.Parameter(norm.weight * 2, requires_grad=False)
        after = model(ids, torch.arange(4)[None], model.new_cache(1, 4))
        second = NativeDecoder.for_model(model)
        assert second is not first
        assert not torch.equal(before, after)
        state = {k: v * 1.5 if k.endswith("norm.weight") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)  # in place
        assert NativeDecoder.for_model(model) is not second
        assert not torch.equal(after, model(ids, torch.arange(4)[None], model.new_cache(1, 4)))
        model.double()  # a cast moves the norms: the plan follows
        third = NativeDecoder.for_model(model)
        assert third is not None and NativeDecoder.for_model(model) is third


def test_unsupported_models_and_caches_take_the_torch_path():
    cfg = CONFIGS["bitnet"]
    assert NativeDecoder.for_model(random_model(cfg, kernel="reference")) is None
    model = random_model(cfg, kernel="cpu")
    dec = NativeDecoder.for_model(model)
    x = torch.zeros(1, 1, cfg.hidden_size)
    assert dec.fits(x, model.new_cache(1, 4)) and dec.fits(x, model.new_cache(1, 4, dtype=torch.float32))
    assert not dec.fits(x, model.new_cache(1, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="outside the KV cache"), torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]), model.new_cache(1, 4))
