"""`pybitnet chat`: the REPL (history, /set, /reset, /exit, multi-line input), through CliRunner and
through a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pybitnet import SamplingParams
from pybitnet.engine import LLM
from pybitnet.engine.chat_session import ChatSession, parse_command
from pybitnet.errors import InvalidRequestError
from test_engine_helpers import cli_app, cli_model_args, tiny_llm

FLAGS = ["-n", "8", "--temp", "0", "--ignore-eos", "-s", "3"]


def params(**kw) -> SamplingParams:
    base = dict(max_tokens=8, temperature=0, top_k=40, top_p=0.95, min_p=0.05, seed=3, ignore_eos=True)
    return SamplingParams(**{**base, **kw})


def reply(llm: LLM, messages: list[dict], p: SamplingParams) -> str:
    return llm.chat(messages, p)[0].text


def test_chat_repl_history_settings_and_multiline():
    llm = tiny_llm()
    lines = [
        "Hello there",
        "/set temp 0.5",
        '"""',
        "line one",
        'line two"""',
        "/reset",
        "Hello there",
        "/unknown",
        "/set nope 1",
        "/set temp abc",
        "/exit",
        "never read",
    ]
    result = CliRunner().invoke(cli_app(), ["chat", *cli_model_args(), *FLAGS], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    first = reply(llm, [{"role": "user", "content": "Hello there"}], params())
    history = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "line one\nline two"},
    ]
    second = reply(llm, history, params(temperature=0.5))
    after_reset = reply(llm, [{"role": "user", "content": "Hello there"}], params(temperature=0.5))
    out = result.stdout
    assert first + "\n\n" in out and second + "\n\n" in out and after_reset + "\n\n" in out
    assert out.index(first) < out.index("Set temperature to 0.5.") < out.index(second)
    assert "Cleared session context." in out and "Unknown command '/unknown'" in out
    assert "unknown setting 'nope'" in result.stderr and "temp needs a number" in result.stderr


def test_chat_session_unit():
    session = ChatSession(tiny_llm(), params(), system="Be brief.")
    text = "".join(session.reply("Hi"))
    assert session.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": text},
    ]
    assert session.set("top_k", "5") == "Set top_k to 5." and session.params.top_k == 5
    assert session.set("n_predict", "-1").endswith("None.") and session.params.max_tokens is None
    assert session.set("system", "") == "Cleared system message." and session.system is None
    with pytest.raises(InvalidRequestError, match="top_p must be in"):
        session.set("top_p", "2")
    interrupted = session.reply("Again")
    next(interrupted)
    interrupted.close()  # an interrupted turn does not join the history
    assert len(session.history) == 2
    session.reset()
    assert session.history == [] and session.messages == []
    assert parse_command(" /set temp 0.5 ").args == "temp 0.5" and parse_command("hello /x") is None


def test_chat_needs_a_template(tmp_path):
    import json

    from test_engine_helpers import model_dir

    d = tmp_path / "m"
    shutil.copytree(model_dir(), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(cli_app(), ["chat", str(d), "--kernel", "reference"], input="hi\n")
    assert result.exit_code == 1 and "no chat template" in result.stderr


class Tmux:
    """A private tmux server (own socket) running one command in a real terminal."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.socket = f"pybitnet-test-{uuid.uuid4().hex[:8]}"
        self.session = "chat"
        shell_cmd = " ".join(_quote(c) for c in command)
        self._tmux("new-session", "-d", "-s", self.session, "-x", "160", "-y", "50", shell_cmd, env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=True,
        )
        return out.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", self.session, "-S", "-200")

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out; the terminal shows:\n{self.screen()}")

    def alive(self) -> bool:
        return (
            subprocess.run(
                ["tmux", "-L", self.socket, "has-session", "-t", self.session], capture_output=True
            ).returncode
            == 0
        )

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _shown(text: str) -> str:
    """What a terminal shows of text, compared without layout: printable characters except whitespace."""
    return "".join(c for c in text if c.isprintable() and not c.isspace())


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_real_terminal():
    llm = tiny_llm()
    exe = Path(sys.executable).with_name("pybitnet")
    if not exe.exists():
        pytest.skip("needs the pybitnet console script next to the interpreter")
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    tmux = Tmux([str(exe), "chat", *cli_model_args(), *FLAGS, "--system", "You are a test."], env)
    try:
        tmux.wait_for(lambda s: s.rstrip().endswith(">>>"))
        tmux.send("Hello there", "Enter")
        system = {"role": "system", "content": "You are a test."}
        first = reply(llm, [system, {"role": "user", "content": "Hello there"}], params())
        tmux.wait_for(lambda s: s.count(">>>") == 2)
        tmux.send("/set temp 0.5", "Enter")
        tmux.wait_for(lambda s: "Set temperature to 0.5." in s)
        tmux.send('"""first line', "Enter")
        tmux.send('second line"""', "Enter")
        screen = tmux.wait_for(lambda s: s.count(">>>") == 4)
        history = [
            system,
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "first line\nsecond line"},
        ]
        second = reply(llm, history, params(temperature=0.5))
        for text in (first, second):  # the terminal shows no control characters (the CLI drops them)
            assert _shown(text) in _shown(screen), (text, screen)
        assert "... second line" in screen  # the continuation prompt of the multi-line message
        tmux.send("/reset", "Enter")
        tmux.wait_for(lambda s: "Cleared session context." in s)
        tmux.send("/exit", "Enter")
        deadline = time.monotonic() + 30
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tmux.alive()
    finally:
        tmux.close()
