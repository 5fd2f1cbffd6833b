"""The CUDA engine path against the reference model: greedy tokens equal, batched rows equal single rows.
On the GPU with CUDA graphs; without one, the same forward passes run eagerly in Triton's CPU interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # before triton is imported (tests/conftest.py does it too)
pytest.importorskip("triton")

from pybitnet.engine.cuda_graph import CudaGraphEngine, CudaGraphRunner
from pybitnet.engine.cuda_graph_runner import make_runner
from pybitnet.engine.runner import ModelRunner
from pybitnet.errors import ContextLengthError, InvalidRequestError
from pybitnet.kernels.triton import matmul as mm
from pybitnet.models.greedy import greedy_decode
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# the interpreter runs a program at a time: one layer and a few tokens there, the real test on the GPU
LAYERS, NEW_TOKENS = (2, 64) if GPU else (1, 6)
PROMPT = [1, 17, 33, 250, 9, 77, 401, 5]


def _model(dtype=torch.float32):
    # untied: with a tied embedding a random model's greedy output just repeats its input token
    cfg = preset("tiny-bitnet", num_hidden_layers=LAYERS, tie_word_embeddings=False)
    model = random_model(cfg, seed=3, dtype=dtype, kernel="reference")
    model.head_mode = "float"  # the reference: integer-exact ternary linears, the float output head
    return model


def test_greedy_tokens_equal_the_reference_kernel_on_cpu():
    model = _model()
    ref = greedy_decode(model, PROMPT, NEW_TOKENS)
    engine = CudaGraphEngine(model.to(DEV), max_batch_size=2, max_len=96, lm_head="float")
    assert engine.generate([PROMPT], NEW_TOKENS) == [ref]
    # a second, shorter prompt in the same batch changes nothing for the first (rows are independent)
    batched = engine.generate([PROMPT, PROMPT[:3]], NEW_TOKENS)
    assert batched[0] == ref
    assert batched[1] == engine.generate([PROMPT[:3]], NEW_TOKENS)[0]


def test_int8_lm_head_and_bf16_baseline_track_the_model():
    """The int8 lm_head and the dense bf16 engine approximate the model: next-token logits stay close."""
    model = _model()
    with torch.inference_mode():
        ref = model(torch.tensor([PROMPT]), last_only=True)[0, -1]
    for weights, head in (("ternary", "int8"), ("bf16", "float")):
        engine = CudaGraphEngine(model.to(DEV), max_batch_size=1, max_len=32, weights=weights, lm_head=head)
        logits = engine.prefill([PROMPT])[0].cpu()
        cos = torch.nn.functional.cosine_similarity(logits, ref, dim=0)
        assert cos > 0.99, (weights, head, cos)
        model.cpu()


@pytest.mark.parametrize("head", ["float", "int8"])
def test_norm_in_producer_decodes_the_same_tokens(head):
    """Batch 1 with each input norm + quantization done by the producing GEMV's last program: the same greedy
    tokens as the fused-prologue engine (the same math; a norm's sum may be added in another order)."""
    model = _model().to(DEV)
    kw = dict(max_batch_size=1, max_len=len(PROMPT) + NEW_TOKENS, lm_head=head)
    ref = CudaGraphEngine(model, **kw).generate([PROMPT], NEW_TOKENS)
    engine = CudaGraphEngine(model, norm_in_producer=True, **kw)
    assert engine.generate([PROMPT], NEW_TOKENS) == ref


@pytest.mark.parametrize("backend", ["int_mm", "w8"])
def test_prefill_through_expanded_weights_is_identical(monkeypatch, backend):
    """The large-M products (codes expanded to int8) are integer-exact with the same epilogue: a prefill that
    uses them gives the same logits, bit for bit, as the 2-bit tensor-core kernel."""
    model = _model()
    # eager prefill: a captured one would replay the products of the first call whatever the settings
    engine = CudaGraphEngine(
        model.to(DEV), max_batch_size=1, max_len=32, weights="ternary", lm_head="float", use_graph=False
    )
    prompt = (PROMPT * 3)[:20]  # more than 16 rows: torch._int_mm takes it
    monkeypatch.setattr(mm, "EXPAND_MIN_ROWS", None)
    ref = engine.prefill([prompt])
    monkeypatch.setattr(mm, "EXPAND_MIN_ROWS", 2)
    monkeypatch.setattr(mm, "EXPAND_BACKEND", backend)
    assert torch.equal(engine.prefill([prompt]), ref)


def test_kept_int8_codes_give_the_same_prefill_and_tokens():
    """weights="ternary_int8" (codes kept as int8 for products of many rows) is the same math: prefill
    logits equal bit for bit, and greedy decoding, alone and batched, gives the same tokens."""
    model = _model().to(DEV)
    kw = dict(max_batch_size=2, max_len=len(PROMPT) + NEW_TOKENS, lm_head="float", use_graph=GPU)
    ref = CudaGraphEngine(model, weights="ternary", **kw)
    kept = CudaGraphEngine(model, weights="ternary_int8", **kw)
    assert kept.forward.layers[0].codes and not ref.forward.layers[0].codes
    # the default keeps them where the GPU has room (a GPU), not on the CPU (the interpreter)
    assert bool(CudaGraphEngine(model, **kw).forward.layers[0].codes) == GPU
    prompts = [PROMPT, PROMPT[:3]]
    assert torch.equal(kept.prefill(prompts), ref.prefill(prompts))
    assert kept.generate(prompts, NEW_TOKENS) == ref.generate(prompts, NEW_TOKENS)


def test_sampling_is_reproducible_and_respects_top_k():
    model = _model()
    engine = CudaGraphEngine(model.to(DEV), max_batch_size=1, max_len=32, lm_head="float")
    torch.manual_seed(0)
    a = engine.generate([PROMPT], 4, temperature=0.8, top_k=1)
    assert a == engine.generate([PROMPT], 4)  # top-k 1 is greedy
    assert len(engine.generate([PROMPT], 4, temperature=1.0, top_p=0.9)[0]) == 4


def test_stop_tokens_and_request_errors():
    model = _model()
    engine = CudaGraphEngine(model.to(DEV), max_batch_size=1, max_len=24, lm_head="float")
    free = engine.generate([PROMPT], 4)[0]
    stopped = engine.generate([PROMPT], 4, stop_token_ids=(free[1],), check_every=1)[0]
    assert stopped == free[:2]
    with pytest.raises(InvalidRequestError):
        engine.generate([PROMPT, PROMPT], 2)
    with pytest.raises(ContextLengthError):
        engine.generate([PROMPT], 20)
    with pytest.raises(ContextLengthError, match="25 tokens"):
        engine.prefill([list(range(25))])


def test_steps_in_a_row_decode_the_same_tokens():
    """Three decode steps a replay give the tokens of one a replay, for counts that are no multiple of three
    (the rest one at a time), and a stop token still ends the output."""
    model = _model().to(DEV)
    one, three = (
        CudaGraphEngine(model, max_batch_size=1, max_len=32, lm_head="float", decode_steps=k) for k in (1, 3)
    )
    for n in (1, 4, 6):
        assert three.generate([PROMPT], n) == one.generate([PROMPT], n)
    free = one.generate([PROMPT], 6)[0]
    want = free[: free.index(free[2]) + 1]
    assert three.generate([PROMPT], 6, stop_token_ids=(free[2],), check_every=1)[0] == want
    with pytest.raises(InvalidRequestError, match="decode_steps"):
        CudaGraphEngine(model, max_len=32, decode_steps=0)


def test_prefill_into_listed_rows_equals_prefill_at_an_offset():
    """The cache rows of a prefill as a device tensor (what a captured prefill replays with) write the same
    entries and give the same logits as the row offset."""
    model = _model().to(DEV)
    engine = CudaGraphEngine(model, max_batch_size=3, max_len=32, lm_head="float", use_graph=False)
    ids = torch.tensor([PROMPT, PROMPT[::-1]], device=DEV)
    lengths = torch.tensor([len(PROMPT), 5], device=DEV)
    cache = engine.cache
    want = engine.forward.prefill(ids, lengths, cache, row0=1)
    k, v = cache.k.clone(), cache.v.clone()
    cache.k.zero_()
    cache.v.zero_()
    got = engine.forward.prefill(ids, lengths, cache, rows=torch.tensor([1, 2], device=DEV))
    assert torch.equal(got, want) and torch.equal(cache.k, k) and torch.equal(cache.v, v)


@pytest.mark.parametrize(
    "programs,fused,overlap", [(None, None, True), (2, False, True), (3, GPU, True), (3, GPU, False)]
)
def test_layer_kernel_gives_the_five_launches_results(programs, fused, overlap):
    """A decoder layer as one persistent launch (phase by phase in the interpreter; on the GPU, phases behind
    grid barriers, also with fewer programs than work items so each loops; with and without the first work
    item's loads before the wait): the same output row and cache writes as the five separate launches, over
    several decode steps (the barrier counters keep growing)."""
    from pybitnet.kernels.triton.attention import decode_attention
    from pybitnet.kernels.triton.decode_layer import decode_layer

    model = _model().to(DEV)
    engine = CudaGraphEngine(model, max_batch_size=1, max_len=32, lm_head="float")
    fwd, cache = engine.forward, engine.cache
    engine.prefill([PROMPT])
    k0, v0 = cache.k.clone(), cache.v.clone()
    layer = fwd.layers[0]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = (torch.randn(1, model.config.hidden_size, generator=g) * 3).to(DEV)
        pos = torch.tensor([len(PROMPT) + step], dtype=torch.int32, device=DEV)
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        qkv = fwd._attention_in(x, layer)
        attn = decode_attention(qkv, fwd.cos, fwd.sin, pos, cache.k[0], cache.v[0], fwd.n_heads, fwd.n_kv)
        want = fwd._mlp(fwd._attention_out(attn, x, layer), layer)
        k_want, v_want = cache.k.clone(), cache.v.clone()
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        got = decode_layer(
            x, layer.gains_and_weights(), fwd.cos, fwd.sin, pos, cache.k[0], cache.v[0], fwd.n_heads,
            fwd.n_kv, fwd.eps, fwd.act, fwd.barriers[:1], programs=programs, fused=fused, overlap=overlap,
        )  # fmt: skip
        assert torch.equal(cache.k, k_want) and torch.equal(cache.v, v_want)
        if GPU:  # attention's dot products may group their sums by the launch's warp count
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want)


def test_layer_kernel_rejects_what_it_cannot_run():
    from pybitnet.kernels.triton.decode_layer import decode_layer

    model = _model().to(DEV)
    fwd = CudaGraphEngine(model, max_batch_size=2, max_len=32, lm_head="float").forward
    layer, cache_k = fwd.layers[0], torch.zeros(2, fwd.n_kv, 32, fwd.head_dim, device=DEV)
    pos = torch.zeros(2, dtype=torch.int32, device=DEV)
    args = (fwd.cos, fwd.sin, pos, cache_k, cache_k, fwd.n_heads, fwd.n_kv, fwd.eps, fwd.act)
    args += (fwd.barriers[:1],)
    with pytest.raises(ValueError, match="one row"):
        decode_layer(torch.zeros(2, model.config.hidden_size, device=DEV), layer.gains_and_weights(), *args)
    dense = (layer.ln1, layer.qkv.data, *layer.gains_and_weights()[2:])
    with pytest.raises(ValueError, match="triton_i2"):
        decode_layer(torch.zeros(1, model.config.hidden_size, device=DEV), dense, *args)


def test_layer_kernel_engine_decodes_the_same_tokens():
    model = _model().to(DEV)
    kw = dict(max_batch_size=1, max_len=len(PROMPT) + NEW_TOKENS, lm_head="float")
    ref = CudaGraphEngine(model, **kw).generate([PROMPT], NEW_TOKENS)
    assert CudaGraphEngine(model, layer_kernel=True, **kw).generate([PROMPT], NEW_TOKENS) == ref


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_graph_runner_with_captured_prefill_matches_the_eager_runner():
    """Prefill replayed from a graph per bucket into the slot given at replay: the same logits and decode
    as the eager prefill, with two slots of different lengths sharing one graph."""
    model = _model().to(DEV)
    graphed = CudaGraphRunner(model, 64, lm_head="float")  # the default
    eager = CudaGraphRunner(model, 64, lm_head="float", prefill_graph=False)
    for runner in (graphed, eager):
        runner.reserve(2)
    for slot, ids in enumerate([PROMPT, PROMPT[:5]]):
        torch.testing.assert_close(graphed.prefill(slot, ids), eager.prefill(slot, ids), rtol=1e-4, atol=1e-4)
    assert list(graphed._prefills) == [64]  # one bucket (PREFILL_BUCKET capped at the runner's length)
    tokens, positions = [3, 7], [len(PROMPT), 5]
    assert torch.equal(
        graphed.decode(tokens, positions).argmax(-1), eager.decode(tokens, positions).argmax(-1)
    )


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_graph_runner_matches_the_model_runner():
    model = _model().to(DEV)
    ours, theirs = CudaGraphRunner(model, 64, lm_head="float"), ModelRunner(model, 64)
    for runner in (ours, theirs):
        runner.reserve(2)
    for slot, ids in enumerate([PROMPT, PROMPT[:5]]):
        a, b = ours.prefill(slot, ids), theirs.prefill(slot, ids)
        assert int(a.argmax()) == int(b.argmax())
    for step in range(4):
        tokens, positions = [3 + step, 7 + step], [len(PROMPT) + step, 5 + step]
        a, b = ours.decode(tokens, positions), theirs.decode(tokens, positions)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_make_runner_uses_cuda_graphs_on_a_gpu_only():
    model = _model().to(DEV)
    assert isinstance(make_runner(model, 32), CudaGraphRunner if GPU else ModelRunner)


@pytest.mark.skipif(
    not GPU or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs compute capability 9.0",
)
def test_programmatic_dependent_launch_changes_no_token(monkeypatch):
    """Decode kernels that start before the previous one ends (PDL, the default on Hopper) wait for its
    results: the captured decode gives the same tokens with it on and off, alone and batched."""
    from pybitnet.kernels.triton import common

    model = _model().to(DEV)
    prompts = [PROMPT, PROMPT[:3]]
    results = {}
    for on in (False, True):
        monkeypatch.setattr(common, "PDL", on)
        engine = CudaGraphEngine(model, max_batch_size=2, max_len=len(PROMPT) + NEW_TOKENS)
        results[on] = (engine.generate(prompts[:1], NEW_TOKENS), engine.generate(prompts, NEW_TOKENS))
    assert results[True] == results[False]


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_captured_prefill_matches_the_eager_one():
    """Prefill replayed from a graph (prompts padded to the bucket length) gives the eager prefill's logits;
    a second batch of other prompts and lengths reuses the graph of its (batch, bucket) and is right too."""
    from pybitnet.engine import cuda_graph

    model = _model().to(DEV)
    kw = dict(max_batch_size=2, max_len=2 * cuda_graph.PREFILL_BUCKET, lm_head="float")
    graphed, eager = CudaGraphEngine(model, **kw), CudaGraphEngine(model, prefill_graph=False, **kw)
    for prompts in ([PROMPT, PROMPT[:3]], [PROMPT[::-1] * 3, PROMPT[2:]], [PROMPT * 40]):
        got, ref = graphed.prefill(prompts), eager.prefill(prompts)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert sorted(graphed._prefills) == [(1, 2 * cuda_graph.PREFILL_BUCKET), (2, cuda_graph.PREFILL_BUCKET)]
