"""The engine on tiny random checkpoints: batching, streaming, seeds, continuous batching, cancellation,
stops, context limits, logprobs."""

from __future__ import annotations

import pytest
import torch

from pybitnet import SamplingParams
from pybitnet.engine import Engine
from pybitnet.engine.runner import CacheView
from pybitnet.errors import ContextLengthError, InvalidRequestError
from test_engine_helpers import tiny_llm

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [
    [1, 43, 416],
    [1, 100, 200, 300, 17, 250, 90, 12, 7, 300],
    [1, *range(30, 55)],
]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm("tiny-llama")


def _engine(llm, **kwargs) -> Engine:
    return Engine(llm.model, llm.tokenizer, **{"seed": 0, **kwargs})


def _run_all(engine: Engine) -> dict[str, object]:
    outputs = {}
    while engine.has_unfinished():
        for update in engine.step():
            if update.finished:
                outputs[update.request_id] = update.output
    return outputs


def test_batched_equals_unbatched(llm):
    together = llm.generate(PROMPTS, GREEDY)
    alone = [llm.generate([p], GREEDY)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert all(len(o.token_ids) == 16 and o.finish_reason == "length" for o in together)
    assert len({tuple(o.token_ids) for o in together}) == 3


def test_batched_equals_unbatched_when_sampling_with_seeds(llm):
    params = [
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=s, ignore_eos=True) for s in (1, 2, 3)
    ]
    together = llm.generate(PROMPTS, params)
    alone = [llm.generate([p], sp)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_seed_reproduces_and_differs(llm):
    def run(seed):
        return llm.generate("Once upon a time", SamplingParams(max_tokens=20, temperature=1.0, seed=seed))[0]

    a, b, c = run(11), run(11), run(12)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    "params",
    [
        GREEDY,
        SamplingParams(max_tokens=30, temperature=0.8, seed=3),
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=["e ", "zz"]),
    ],
)
def test_streamed_text_concatenates_to_generated_text(llm, params):
    full = llm.generate("The weather is", params)[0]
    stream = llm.stream("The weather is", params)
    deltas = list(stream)
    assert "".join(deltas) == full.text
    assert stream.output is not None and stream.output.token_ids == full.token_ids
    assert all(deltas)


def test_requests_join_a_running_batch_and_can_be_cancelled(llm):
    alone = {i: llm.generate([p], GREEDY)[0].token_ids for i, p in enumerate(PROMPTS)}
    engine = _engine(llm, max_num_seqs=2)
    a = engine.add_request(PROMPTS[0], GREEDY)
    for _ in range(5):
        engine.step()
    b = engine.add_request(PROMPTS[1], GREEDY)
    c = engine.add_request(PROMPTS[2], GREEDY)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1  # c waits for a free slot
    for _ in range(3):
        engine.step()
    engine.abort(b)
    outputs = _run_all(engine)
    assert outputs[a].token_ids == alone[0]
    assert outputs[c].token_ids == alone[2]  # c got b's slot, whose cache still held b's keys
    assert outputs[b].finish_reason == "abort" and 0 < len(outputs[b].token_ids) < 16
    assert outputs[b].token_ids == alone[1][: len(outputs[b].token_ids)]
    assert engine.num_running == 0 and not engine.has_unfinished()


def test_cancel_a_waiting_request_and_step_when_idle(llm):
    engine = _engine(llm, max_num_seqs=1)
    first = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=3))
    second = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=3))
    engine.abort(second)
    outputs = _run_all(engine)
    assert outputs[second].finish_reason == "abort" and outputs[second].token_ids == []
    assert len(outputs[first].token_ids) == 3
    assert engine.step() == []


def test_context_length_is_enforced(llm):
    engine = _engine(llm, max_model_len=32)
    with pytest.raises(ContextLengthError, match="32"):
        engine.add_request(list(range(1, 33)), GREEDY)
    rid = engine.add_request(
        list(range(1, 21)), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    )
    out = _run_all(engine)[rid]
    assert out.finish_reason == "length" and len(out.token_ids) == 12
    with pytest.raises(InvalidRequestError, match="context size"):
        _engine(llm, max_model_len=10_000)


def test_bad_prompts_are_rejected(llm):
    engine = _engine(llm)
    for prompt, match in [
        ("", "empty"),
        ([], "empty"),
        ([1, 99999], "outside the vocabulary"),
        (3.5, "string"),
    ]:
        with pytest.raises(InvalidRequestError, match=match):
            engine.add_request(prompt, GREEDY)
    engine.add_request([1, 2], SamplingParams(max_tokens=1), request_id="x")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(max_tokens=1), request_id="x")
    _run_all(engine)


def test_stop_token_ids_and_min_tokens(llm):
    reference = llm.generate([PROMPTS[1]], GREEDY)[0].token_ids
    stop = reference[2]
    assert stop not in reference[:2]
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == reference[:3] and out.finish_reason == "stop" and out.stop_reason == stop
    # EOS-like tokens cannot come before min_tokens
    out = llm.generate(
        [PROMPTS[1]], SamplingParams(max_tokens=24, min_tokens=6, temperature=0, stop_token_ids=[stop])
    )[0]
    assert stop not in out.token_ids[:6] and len(out.token_ids) > 6


def test_stop_strings_cut_the_text(llm):
    reference = llm.generate([PROMPTS[2]], GREEDY)[0]
    text = reference.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    out = llm.generate(
        [PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop)
    )[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate(
        [PROMPTS[2]],
        SamplingParams(
            max_tokens=24, temperature=0, ignore_eos=True, stop=stop, include_stop_str_in_output=True
        ),
    )[0]
    assert kept.text == text[: cut + len(stop)]


def test_logprobs_are_the_model_distribution(llm):
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    )[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[token].rank == 1 and len(entry) == 3
        values = [e.logprob for e in entry.values()]
        assert values == sorted(values, reverse=True)
    with torch.no_grad():
        logits = llm.model(torch.tensor([PROMPTS[0]]))[0, -1]
    expected = torch.log_softmax(logits, -1)
    first = out.logprobs[0]
    assert all(abs(v.logprob - expected[t].item()) < 1e-4 for t, v in first.items())
    assert first[out.token_ids[0]].decoded_token == llm.tokenizer.token_text(out.token_ids[0])


def test_penalties_discourage_repeats():
    tied = tiny_llm("tiny-bitnet")  # greedy on a tied random model repeats one token

    def tokens(**kw):
        return tied.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, **kw))[0].token_ids

    assert len(set(tokens())) <= 2
    assert len(set(tokens(repetition_penalty=5.0))) > 12
    by_frequency = tokens(frequency_penalty=2.0)
    assert by_frequency[0] == tokens()[0] and len(set(by_frequency)) > 1


def test_cache_view_writes_through_to_the_cache(llm):
    cache = llm.model.new_cache(3, 64)
    view = CacheView(cache, slice(1, 3), 16)
    k = torch.randn(2, cache.k.shape[2], 1, cache.k.shape[4])
    view.update(0, torch.tensor([[5], [7]]), k, k)
    assert torch.equal(cache.k[0, 1, :, 5], k[0, :, 0]) and torch.equal(cache.v[0, 2, :, 7], k[1, :, 0])
    assert cache.k[0, 0].abs().sum() == 0


def test_engine_driven_from_a_background_thread_with_concurrent_clients(llm):
    """The shape of a server: one thread steps the engine, client threads add and cancel requests."""
    import queue
    import random
    import threading
    import time

    alone = {i: llm.generate([p], GREEDY)[0].token_ids for i, p in enumerate(PROMPTS)}
    engine = _engine(llm, max_num_seqs=3)
    queues: dict[str, queue.Queue] = {}
    lock, stop = threading.Lock(), threading.Event()

    def drive():
        while not stop.is_set():
            for update in engine.step():
                with lock:
                    q = queues.get(update.request_id)
                if q is not None:
                    q.put(update)
            if not engine.has_unfinished():
                stop.wait(0.001)

    results: dict[int, list] = {}

    def client(i: int, cancel: bool):
        time.sleep(random.Random(i).random() * 0.05)
        rid = f"client-{i}"
        q: queue.Queue = queue.Queue()
        with lock:
            queues[rid] = q
        engine.add_request(PROMPTS[i % 3], GREEDY, request_id=rid)
        tokens, text = [], ""
        while True:
            update = q.get(timeout=60)
            tokens += update.delta_token_ids
            text += update.delta_text
            if cancel and len(tokens) >= 3:
                engine.abort(rid)
                cancel = False
            if update.finished:
                results[i] = [tokens, update.output]
                return

    driver = threading.Thread(target=drive)
    driver.start()
    clients = [threading.Thread(target=client, args=(i, i == 4)) for i in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=120)
    stop.set()
    driver.join(timeout=10)
    assert len(results) == 8
    for i, (tokens, out) in results.items():
        assert tokens == out.token_ids
        if i == 4:
            assert out.finish_reason == "abort" and tokens == alone[i % 3][: len(tokens)]
        else:
            assert out.finish_reason == "length" and tokens == alone[i % 3]
    assert not engine.has_unfinished() and engine.num_running == 0


def test_a_runner_plugs_into_the_engine(llm):
    from pybitnet.engine.runner import ModelRunner

    class CountingRunner(ModelRunner):
        prefills = decodes = 0

        def prefill(self, slot, ids):
            CountingRunner.prefills += 1
            return super().prefill(slot, ids)

        def decode(self, tokens, positions):
            CountingRunner.decodes += 1
            return super().decode(tokens, positions)

    engine = _engine(llm, runner=CountingRunner(llm.model, 64))
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=5, ignore_eos=True))
    _run_all(engine)
    assert (CountingRunner.prefills, CountingRunner.decodes) == (2, 4)  # one prefill each, decodes batched
