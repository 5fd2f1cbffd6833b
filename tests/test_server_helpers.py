"""Helpers for the server tests: a real uvicorn server on a free loopback port, in a thread of the test
process, over a tiny dummy model; a small SSE reader; checks of OpenAI-style errors and of metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from pybitnet.engine import LLM
from pybitnet.server import GracefulServer, ServerSettings, build_server
from test_engine_helpers import model_dir

MODEL_NAME = "tiny-bitnet"
# The untied tiny BitNet gives varied greedy text (a tied random model mostly repeats its input token).
MODEL = "tiny-bitnet-untied"


@cache
def _loaded() -> LLM:
    return LLM(model_dir(MODEL), device="cpu", seed=0)


def tiny_llm(max_num_seqs: int = 8, max_model_len: int | None = None) -> LLM:
    """A fresh LLM (own engine) over a model loaded once per test run, with the default CPU kernel."""
    base = _loaded()
    return LLM.from_model(base.model, base.tokenizer, max_model_len, max_num_seqs, seed=0)


@dataclass
class Running:
    url: str
    server: GracefulServer
    thread: threading.Thread

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not shut down"


@contextmanager
def running_server(
    llm: LLM | None = None, load: Callable[[], LLM] | None = None, wait_ready: bool = True, **settings
) -> Iterator[Running]:
    """Serve `llm` (or what `load` returns) on 127.0.0.1 at a free port until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    loader = load or (lambda: llm or tiny_llm())
    server = build_server(
        loader, ServerSettings(model_name=MODEL_NAME, **settings), port=port, log_level="warning"
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = Running(f"http://127.0.0.1:{port}", server, thread)
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if wait_ready:
            while httpx.get(running.url + "/health").status_code != 200:
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.05)
        yield running
    finally:
        if thread.is_alive():
            running.stop()
        sock.close()


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def metric(url: str, name: str, absent: float | None = None) -> float:
    """A sample's value from /metrics (name with labels exactly as Prometheus text writes them). A labelled
    sample exists only once its labels were first used: pass `absent=0.0` to read it as 0 before that."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if absent is not None:
        return absent
    raise KeyError(name)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error
