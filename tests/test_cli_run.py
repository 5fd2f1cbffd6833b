"""`pybitnet run`: streamed completion, chat template or raw, piped stdin, interactive, timings, errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pybitnet import SamplingParams
from test_engine_helpers import cli_app, cli_model_args, tiny_llm

GREEDY_FLAGS = ["-n", "10", "--temp", "0", "--ignore-eos"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, top_k=40, top_p=0.95, min_p=0.05, ignore_eos=True)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, args: list[str], input: str | None = None):
    return runner.invoke(cli_app(), args, input=input)


def test_run_streams_the_chat_reply(runner):
    result = invoke(runner, ["run", *cli_model_args(), "Hello there", *GREEDY_FLAGS])
    assert result.exit_code == 0, result.output
    expected = tiny_llm().chat([{"role": "user", "content": "Hello there"}], GREEDY)[0].text
    assert result.stdout == expected + "\n"


def test_run_raw_system_and_stdin(runner):
    llm = tiny_llm()
    raw = invoke(runner, ["run", *cli_model_args(), "Hello there", "--raw", *GREEDY_FLAGS])
    assert raw.stdout == llm.generate("Hello there", GREEDY)[0].text + "\n"
    piped = invoke(runner, ["run", *cli_model_args(), "--raw", *GREEDY_FLAGS], input="Hello there")
    assert piped.exit_code == 0 and piped.stdout == raw.stdout
    system = invoke(runner, ["run", *cli_model_args(), "Hi", "--system", "Be brief.", *GREEDY_FLAGS])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert system.stdout == llm.chat(messages, GREEDY)[0].text + "\n"


def test_run_seed_reproduces(runner):
    args = ["run", *cli_model_args(), "Tell me a story", "-n", "12", "--temp", "1.0", "-s", "7"]
    first, second = invoke(runner, args), invoke(runner, args)
    assert first.exit_code == 0 and first.stdout == second.stdout
    other = invoke(runner, [*args[:-1], "8"])
    assert other.stdout != first.stdout


def test_run_verbose_prints_ollama_timings(runner):
    result = invoke(runner, ["run", *cli_model_args(), "Hi", "--verbose", *GREEDY_FLAGS])
    assert result.exit_code == 0
    for key in ("total duration:", "load duration:", "prompt eval count:", "prompt eval rate:", "eval count:",
                "eval rate:"):  # fmt: skip
        assert key in result.stderr
    assert "eval count:           10 token(s)" in result.stderr


def test_run_interactive_without_prompt(runner):
    result = invoke(runner, ["run", *cli_model_args(), "-i", *GREEDY_FLAGS], input="Hello there\n/bye\n")
    assert result.exit_code == 0, result.output
    expected = tiny_llm().chat([{"role": "user", "content": "Hello there"}], GREEDY)[0].text
    assert expected + "\n\n" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "/no/such/model-dir", "hi"], "neither an existing path nor a hub id"),
        (["run"], "the prompt is empty"),  # the default model, and empty piped stdin
        (["run", *cli_model_args(), ""], "the prompt is empty"),
        (["run", *cli_model_args(), "hi", "--temp", "-1"], "temperature must be >= 0"),
        (["run", *cli_model_args(), "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["run", *cli_model_args(), "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["run", *cli_model_args(), "a long prompt " * 10, "-c", "16"], "the context holds 16"),
        (["run", *cli_model_args(), "hi", "--kernel", "nope"], "unknown kernel"),
    ],
)
def test_run_errors_are_clear(runner, args, message):
    result = invoke(runner, args)
    assert result.exit_code == 1
    assert "Error:" in result.stderr and message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_verbs_are_registered(runner):
    result = invoke(runner, ["--help"])
    for verb in ("run", "chat", "generate", "pull", "list", "rm"):
        assert f" {verb} " in result.stdout
