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


def _decode(model, ids: torch.Tensor, prompt: int, native: bool, monkeypatch) -> tuple[torch.Tensor, object]:
    """Logits of a prompt forward then one-token steps, on the native decoder or the torch layers."""
    with monkeypatch.context() as m:
        if not native:
            m.setattr(NativeDecoder, "fits", lambda self, x, cache: False)
        b, t = ids.shape
        cache = model.new_cache(b, t + 3)
        offsets = torch.arange(b)[:, None]  # rows at different positions, as batched decode has them
        out = [model(ids[:, :prompt], torch.arange(prompt) + offsets, cache)]
        out += [model(ids[:, i : i + 1], torch.full((b, 1), i) + offsets, cache) for i in range(prompt, t)]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("isa", PATHS)
def test_native_decoder_matches_torch_layers(name, isa, monkeypatch):
    cfg = CONFIGS[name]
    model = random_model(cfg, seed=1, kernel=f"cpu-{isa}")
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, got_cache = _decode(model, ids, 3, True, monkeypatch)
        assert isinstance(NativeDecoder.for_model(model), NativeDecoder)
        want, want_cache = _decode(model, ids, 3, False, monkeypatch)
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


@pytest.mark.parametrize("name", ["bitnet", "llama-odd"])
def test_native_decoder_matches_reference_model(name):
    """The reference kernel (torch, integer-exact) with torch attention defines truth; the native decoder
    differs by float rounding only (norm sums, softmax), with the float head for both."""
    cfg = CONFIGS[name]
    ref, nat = random_model(cfg, seed=3, kernel="reference"), random_model(cfg, seed=3, kernel="cpu")
    nat.head_mode = "float"
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = ref(ids)
        cache = nat.new_cache(2, 12)
        steps = [nat(ids[:, :6], torch.arange(6).expand(2, -1), cache)]
        steps += [nat(ids[:, i : i + 1], torch.full((2, 1), i), cache) for i in range(6, 10)]
    got = torch.cat(steps, 1)
    assert torch.allclose(got, want, rtol=0, atol=2e-3 * want.abs().max().item())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_bf16_model_runs_native_with_a_float32_cache():
    cfg = CONFIGS["bitnet"]
    ref = random_model(cfg, seed=5, kernel="reference")
    nat = random_model(cfg, seed=5, kernel="cpu", dtype=torch.bfloat16)
    nat.head_mode = "float"
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache = nat.new_cache(1, 8)
        assert cache.k.dtype == torch.float32 and NativeDecoder.for_model(nat).fits(ids[..., None], cache)
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
    assert dec.fits(x, model.new_cache(1, 4))
    assert not dec.fits(x, model.new_cache(1, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="outside the KV cache"), torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]), model.new_cache(1, 4))
