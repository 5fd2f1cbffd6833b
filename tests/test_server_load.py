"""The server under load on a tiny model: 64 concurrent streaming clients (each greedy stream identical to the
same request served alone), disconnecting clients freeing their slots, overload answered with 429, and a
shutdown that cleanly cancels the streams still running after its grace period."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from test_server_helpers import MODEL_NAME, assert_openai_error, metric, running_server, sse_events, tiny_llm

PROMPTS = [
    "Once upon a time",
    "The weather is nice",
    "Computers store numbers as bits.",
    "Hello! How are you?",
]


def _request(i: int) -> tuple[str, dict]:
    """The i-th of 8 distinct greedy streaming requests: chat or completion, 4 prompts, 4 lengths."""
    prompt, max_tokens = PROMPTS[i % 4], 6 + 4 * (i % 4)
    common = {
        "model": MODEL_NAME,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if i % 8 < 4:
        return "/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/completions", {**common, "prompt": prompt}


def _text(event: dict) -> str:
    choice = event["choices"][0]
    return choice["delta"].get("content") or "" if "delta" in choice else choice["text"]


async def _stream(client: httpx.AsyncClient, api: str, i: int) -> tuple[str, str | None, bool]:
    """(text, finish_reason, ended with [DONE]) of one streamed request."""
    path, body = _request(i)
    text, finish, done = "", None, False
    async with client.stream("POST", api + path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            for event in sse_events([line]):
                if event == "[DONE]":
                    done = True
                    continue
                assert "error" not in event, event
                if event["choices"]:
                    text += _text(event)
                    finish = event["choices"][0]["finish_reason"] or finish
    return text, finish, done


async def _burst(url: str, n: int) -> tuple[list, float]:
    """n concurrent streams; also the largest batch /metrics showed while they ran."""
    peak = 0.0
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = [asyncio.create_task(_stream(client, url + "/v1", i)) for i in range(n)]
        while not all(t.done() for t in tasks):
            response = await client.get(url + "/metrics")
            for line in response.text.splitlines():
                if line.startswith("pybitnet_running_sequences "):
                    peak = max(peak, float(line.split()[1]))
            await asyncio.sleep(0.05)
        return [t.result() for t in tasks], peak


def test_64_concurrent_streams_equal_each_request_served_alone():
    with running_server(tiny_llm(max_num_seqs=16, max_model_len=256), max_queue=64) as server:

        async def alone() -> list:
            async with httpx.AsyncClient(timeout=60) as client:
                return [await _stream(client, server.api, i) for i in range(8)]

        references = asyncio.run(alone())
        results, peak = asyncio.run(_burst(server.url, 64))
        assert peak > 1  # they really shared the batch
        for i, (text, finish, done) in enumerate(results):
            assert done and finish == "length", (i, finish, done)
            assert (text, finish, done) == references[i % 8], i
        assert metric(server.url, "pybitnet_running_sequences") == 0
        assert metric(server.url, "pybitnet_queue_depth") == 0
        assert (
            metric(server.url, 'pybitnet_requests_total{endpoint="/v1/chat/completions",status="200"}') == 36
        )
        assert metric(server.url, 'pybitnet_requests_total{endpoint="/v1/completions",status="200"}') == 36


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


LONG = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 500, "ignore_eos": True}
TOKENS = "pybitnet_generation_tokens_total"


def test_disconnected_clients_free_their_slots():
    with running_server(tiny_llm(max_num_seqs=1, max_model_len=512)) as server:
        url = server.api + "/completions"
        with httpx.Client(timeout=30) as client:
            # a running stream and one queued behind it; the queued client leaves first, then the running one
            with client.stream("POST", url, json={**LONG, "stream": True}) as running:
                events = sse_events(running.iter_lines())
                assert next(events)["choices"][0]["text"] is not None  # a token, not an error event
                with client.stream("POST", url, json={**LONG, "stream": True}) as queued:
                    assert queued.status_code == 200
                    assert _wait_for(lambda: metric(server.url, "pybitnet_queue_depth") == 1)
                assert _wait_for(lambda: metric(server.url, "pybitnet_queue_depth") == 0)
            assert _wait_for(lambda: metric(server.url, "pybitnet_running_sequences") == 0, timeout=5)
        streamed = metric(server.url, TOKENS)
        # the running one stopped before its max_tokens, the queued one never started
        assert streamed < LONG["max_tokens"]

        # a non-streaming client that gives up is cancelled too (counted as 499, client closed request)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=LONG, timeout=httpx.Timeout(30, read=0.05))
        assert _wait_for(lambda: metric(server.url, "pybitnet_running_sequences") == 0, timeout=5)
        gone = 'pybitnet_requests_total{endpoint="/v1/completions",status="499"}'
        assert _wait_for(lambda: metric(server.url, gone) == 1)
        assert metric(server.url, TOKENS) - streamed < LONG["max_tokens"]
        # and the freed slot serves the next request at once
        reply = httpx.post(url, json={**LONG, "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_overload_answers_429_never_an_exception():
    with running_server(tiny_llm(max_num_seqs=1), max_queue=2) as server:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 8, "ignore_eos": True}
                return await asyncio.gather(
                    *(client.post(server.api + "/completions", json=body) for _ in range(12))
                )

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
        for r in responses:
            if r.status_code == 429:
                assert_openai_error(r, 429, "rate_limit_exceeded")
                assert r.headers["retry-after"] == "1"
            else:
                assert r.json()["usage"]["completion_tokens"] == 8
        # a request asking for more sequences than the server ever holds is a 400, not a 429 to retry forever
        too_many = httpx.post(server.api + "/completions", json={"prompt": "Hi", "n": 4})
        assert_openai_error(too_many, 400)
        assert (
            httpx.post(server.api + "/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        )


def test_shutdown_cancels_streams_still_running_after_the_grace_period():
    # (streams that end within the grace period finish normally: see test_server_cli.py)
    with running_server(tiny_llm(max_num_seqs=2, max_model_len=512), shutdown_timeout=0.0) as server:
        events: list = []
        started = threading.Event()

        def read() -> None:
            with httpx.stream("POST", server.api + "/completions", json={**LONG, "stream": True}) as response:
                for event in sse_events(response.iter_lines()):
                    events.append(event)
                    started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        server.server.should_exit = True
        reader.join(30)
        assert events[0]["choices"][0]["text"] is not None
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "request_cancelled"
        assert len(events) < LONG["max_tokens"]
        server.thread.join(30)
        assert not server.thread.is_alive()
