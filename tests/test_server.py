"""The OpenAI-compatible server over a tiny model: the official openai client (chat and completions, streamed
and not), sampling fields, logprobs, errors in OpenAI's shape, API key, models, health, metrics, OpenAPI."""

from __future__ import annotations

import copy
import re
import threading

import httpx
import pytest

from pybitnet import LLM, SamplingParams
from test_server_helpers import (
    MODEL_NAME,
    assert_openai_error,
    metric,
    running_server,
    tiny_llm,
)

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Tell me a story about the river."}]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(max_num_seqs=4, max_model_len=256)


@pytest.fixture(scope="module")
def server(llm):
    with running_server(llm, max_tokens=64) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _reference_chat(llm, max_tokens: int) -> str:
    """The same chat reply through the Python API (run on a separate engine over the same model)."""
    other = tiny_llm(max_num_seqs=1, max_model_len=256)
    return other.chat(MESSAGES, _greedy(max_tokens))[0].text


def test_chat_with_openai_client(client, llm):
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.object == "chat.completion"
    assert reply.model == MODEL_NAME
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content == _reference_chat(llm, 12)
    prompt_len = len(llm.chat_prompt(MESSAGES))
    assert reply.usage.prompt_tokens == prompt_len
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == prompt_len + 12


def test_chat_streamed_with_openai_client(client, llm):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _reference_chat(llm, 12)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_with_openai_client(client, llm):
    prompt = "Once upon a time"
    expected = tiny_llm(max_num_seqs=1, max_model_len=256).generate([prompt], _greedy(10))[0]
    reply = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == 10

    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 1


def test_completions_token_prompts_and_several_prompts(client):
    single = client.completions.create(model=MODEL_NAME, prompt=[1, 43, 416], max_tokens=5, temperature=0)
    many = client.completions.create(
        model=MODEL_NAME, prompt=[[1, 43, 416], [1, 100, 200, 300]], max_tokens=5, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == single.choices[0].text  # greedy: n copies
    assert many.usage.prompt_tokens == 3 + 4
    assert 4 <= many.usage.completion_tokens <= 4 * 5


def test_seed_n_and_stop(client):
    def sample(**kw):
        return client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            extra_body={"top_k": 50},
            **kw,
        )

    a, b = sample(seed=7, n=3), sample(seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # choices differ (choice j uses seed + j)
    single = sample(seed=8)
    assert single.choices[0].message.content == texts[1]

    full = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0
    )
    text = full.choices[0].text
    words = re.findall(r"[A-Za-z]{3,}", text[len(text) // 3 :])
    if not words:
        pytest.skip("the tiny model's greedy text has no usable stop string")
    cut = words[0]
    stopped = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(cut)]


def test_sampling_fields_accepted(client):
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "system", "content": "Be brief."}, *MESSAGES],
        max_completion_tokens=6,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=1,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6},
    )
    assert reply.usage.completion_tokens == 6
    assert reply.choices[0].finish_reason == "length"


def test_token_healing_field_matches_the_python_api(client):
    prompt = "Once upon a time"
    healed = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, token_healing=True)
    expected = tiny_llm(max_num_seqs=1, max_model_len=256).generate([prompt], healed)[0]
    reply = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "token_healing": True},
    )
    assert reply.choices[0].text == expected.text
    with pytest.raises(openai.BadRequestError, match="token_healing"):
        client.completions.create(model=MODEL_NAME, prompt=prompt, extra_body={"token_healing": "yes"})


def test_logprobs(client, llm):
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == entry.top_logprobs[0].logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.bytes == list(entry.token.encode())

    completion = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(
        len(top) <= 2 and max(top.values()) == chosen
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert lp.text_offset[0] == 0

    expected = tiny_llm(max_num_seqs=1, max_model_len=256).generate(
        ["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    )[0]
    assert lp.token_logprobs == [
        e[t].logprob for t, e in zip(expected.token_ids, expected.logprobs, strict=True)
    ]

    streamed = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [
        t for chunk in streamed if chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.token_logprobs
    ]
    assert tokens == lp.token_logprobs


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra == {"max_model_len": 256, "has_chat_template": True}
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(
        spec["paths"]
    )


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"messages": MESSAGES, "temperature": 3}, 400, "temperature", None),
        ({"messages": MESSAGES, "temperature": "1"}, 400, "temperature", None),
        ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", None),
        ({"messages": MESSAGES, "max_tokens": 65}, 400, "max_tokens", "max_tokens_exceeded"),
        ({"messages": MESSAGES, "top_p": 0}, 400, "top_p", None),
        ({"messages": MESSAGES, "seed": 2**64}, 400, "seed", None),
        ({"messages": MESSAGES, "n": 0}, 400, "n", None),
        ({"messages": MESSAGES, "n": 100}, 400, "n", None),
        ({"messages": MESSAGES, "min_tokens": 10, "max_tokens": 5}, 400, "min_tokens", None),
        ({"messages": MESSAGES, "stop": [""]}, 400, "stop", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            400,
            None,
            None,
        ),
        ({"messages": MESSAGES, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools", None),
        ({"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
        (
            {"messages": [{"role": "user", "content": "word " * 400}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({}, 400, "messages", None),
    ],
)
def test_chat_errors(server, body, status, param, code):
    error = assert_openai_error(httpx.post(server.api + "/chat/completions", json=body), status, code)
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": ""}, None),
        ({"prompt": []}, None),
        ({"prompt": [[]]}, None),
        ({"prompt": [1, 100000]}, None),
        ({"prompt": "hi", "max_tokens": 60, "logprobs": 21}, None),
        ({"prompt": [1] * 300}, "context_length_exceeded"),
        ({"prompt": [1] * 220, "max_tokens": 64}, "context_length_exceeded"),
        ({"prompt": "hi", "echo": True}, None),
        ({"prompt": "hi", "suffix": "x"}, None),
        ({"prompt": "hi", "logit_bias": {"5": 1.0}}, None),
        ({"prompt": True}, None),
    ],
)
def test_completion_errors(server, body, code):
    assert_openai_error(httpx.post(server.api + "/completions", json=body), 400, code)


def test_malformed_requests_get_openai_errors(server):
    url = server.api + "/chat/completions"
    error = assert_openai_error(
        httpx.post(url, content=b'{"messages": [', headers={"Content-Type": "application/json"}),
        400,
        "invalid_json",
    )
    assert "JSON" in error["message"]
    assert_openai_error(httpx.post(url, content=b"not json at all"), 400)
    assert_openai_error(httpx.post(url, content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    assert_openai_error(httpx.get(url), 405)
    assert_openai_error(httpx.get(server.api + "/nothing-here"), 404)


def test_api_key(llm):
    other = tiny_llm(max_num_seqs=1, max_model_len=256)
    with running_server(other, api_key="s3cret") as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.post(
                server.api + "/chat/completions", json={"messages": MESSAGES}, headers=headers
            )
            assert_openai_error(response, 401, "invalid_api_key")
        assert_openai_error(httpx.get(server.api + "/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.api, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.api, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=2
        ).usage.completion_tokens
        assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
        assert httpx.get(server.url + "/metrics").status_code == 200
        spec = httpx.get(server.url + "/openapi.json").json()
        assert spec["paths"]["/v1/chat/completions"]["post"]["security"] == [{"apiKey": []}]


def test_metrics_count_requests_and_tokens(server, client):
    requests_before = metric(
        server.url, 'pybitnet_requests_total{endpoint="/v1/completions",status="200"}', absent=0.0
    )
    tokens_before = metric(server.url, "pybitnet_generation_tokens_total")
    ttft_before = metric(server.url, "pybitnet_time_to_first_token_seconds_count")
    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert (
        metric(server.url, 'pybitnet_requests_total{endpoint="/v1/completions",status="200"}')
        == requests_before + 1
    )
    assert metric(server.url, "pybitnet_generation_tokens_total") == tokens_before + 3
    assert metric(server.url, "pybitnet_time_to_first_token_seconds_count") == ttft_before + 1
    assert metric(server.url, "pybitnet_request_latency_seconds_count") >= 1
    assert metric(server.url, "pybitnet_queue_depth") == 0
    assert metric(server.url, "pybitnet_running_sequences") == 0
    assert metric(server.url, "pybitnet_prompt_tokens_total") > 0
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_health_is_503_while_loading():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_llm(max_num_seqs=1)

    with running_server(load=slow_load, wait_ready=False) as server:
        assert_openai_error(httpx.get(server.url + "/health"), 503, "model_loading")
        assert_openai_error(
            httpx.post(server.api + "/completions", json={"prompt": "hi"}), 503, "model_loading"
        )
        assert httpx.get(server.url + "/").status_code == 200  # the page loads and waits
        release.set()
        for _ in range(200):
            if httpx.get(server.url + "/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_without_a_chat_template_is_a_400(llm):
    tokenizer = copy.copy(llm.tokenizer)
    tokenizer.chat_template = None
    plain = LLM.from_model(llm.model, tokenizer, max_model_len=256, max_num_seqs=1)
    with running_server(plain) as server:
        assert httpx.get(server.api + "/models").json()["data"][0]["has_chat_template"] is False
        response = httpx.post(server.api + "/chat/completions", json={"messages": MESSAGES})
        assert "chat template" in assert_openai_error(response, 400)["message"]
        completion = httpx.post(server.api + "/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert completion.status_code == 200
