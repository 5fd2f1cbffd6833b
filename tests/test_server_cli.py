"""`pybitnet serve`: a real server process over a tiny checkpoint that answers, finishes an in-flight stream
on SIGTERM and exits 0; and the errors it gives before starting."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from test_engine_helpers import cli_app, model_dir
from test_server_helpers import MODEL, sse_events

pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_answers_and_shuts_down_gracefully():
    port = _free_port()
    command = [
        sys.executable,
        "-c",
        "from pybitnet.cli.app import main; main()",
        "serve",
        str(model_dir(MODEL)),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--alias",
        "tiny",
        "--max-tokens",
        "32",
        "--shutdown-timeout",
        "20",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 16, "ignore_eos": True, "stream": True}
        events: list = []
        first = threading.Event()

        def read() -> None:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for event in sse_events(response.iter_lines()):
                    events.append(event)
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(30)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-3:]
        assert sum(len(e["choices"]) for e in events[:-1]) >= 2
        output, _ = process.communicate(timeout=60)
        # uvicorn re-raises the signal once it has shut down, so the exit status says "ended by SIGTERM"
        assert process.returncode in (0, -signal.SIGTERM), output
        assert "Shutting down" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/model-dir"], "nonexistent"),
        (["MODEL", "--parallel", "0"], "--parallel"),
        (["MODEL", "--max-queue", "-1"], "--max-queue"),
        (["MODEL", "--log-level", "loud"], "--log-level"),
    ],
)
def test_serve_refuses_bad_arguments_before_starting(args, message):
    args = [str(model_dir(MODEL)) if a == "MODEL" else a for a in args]
    result = CliRunner().invoke(cli_app(), ["serve", *args])
    assert result.exit_code == 1
    assert message in result.output


def test_serve_exits_1_when_the_model_fails_to_load(tmp_path):
    # the directory exists, so the server starts, then loading it in the background fails
    result = CliRunner().invoke(cli_app(), ["serve", str(tmp_path), "--port", str(_free_port())])
    assert result.exit_code == 1, result.output
    assert "failed to load" in result.output


def test_serve_help_lists_the_options():
    result = CliRunner().invoke(cli_app(), ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--api-key", "--parallel", "--max-queue", "--max-tokens", "--alias"):
        assert option in result.output
