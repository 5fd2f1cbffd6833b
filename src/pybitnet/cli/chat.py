"""`pybitnet chat [MODEL]`: an interactive chat (REPL) with history, slash commands and multi-line input."""

from __future__ import annotations

import contextlib

import typer
from rich.markup import escape

from ..engine import LLM, SamplingParams
from ..engine.chat_session import ChatSession, parse_command
from ..errors import PyBitNetError
from .common import (
    LoadOptions,
    ModelArg,
    System,
    Verbose,
    err,
    generation_options,
    print_timings,
    user_errors,
    write_out,
)

HELP = """\
Available commands:
  /set temp 0.5      change a setting (temp, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                     frequency_penalty, seed, n_predict, system TEXT, verbose, quiet)
  /show              show the current settings
  /reset             forget the conversation (/clear does the same)
  /exit              leave (/bye, /quit or Ctrl+D too)
  /?, /help          this help

Use \"\"\" to begin and end a multi-line message, or end a line with \\ to continue it."""


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)


@generation_options(n_predict=-1)
def chat(
    model: ModelArg = None,
    system: System = None,
    verbose: Verbose = False,
    *,
    params: SamplingParams,
    load: LoadOptions,
) -> None:
    """Chat with a model in the terminal."""
    with user_errors():
        llm, load_s = load.load(model)
        if llm.tokenizer.chat_template is None:
            raise PyBitNetError(
                "this model has no chat template, so it cannot chat; use `pybitnet run MODEL PROMPT --raw` "
                "for plain completion"
            )
    chat_loop(llm, params, system, verbose, load_s)


def read_message(prompt: str = ">>> ") -> str:
    """One user message: a line, lines joined by a trailing backslash, or a \"\"\"-delimited block.
    Raises EOFError at the end of input."""
    line = input(prompt)
    stripped = line.strip()
    if stripped.startswith('"""'):
        first = stripped[3:]
        if first.endswith('"""'):
            return first[:-3]
        lines = [first] if first else []
        while True:
            more = input("... ")
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(more)
    while line.endswith("\\"):
        line = line[:-1] + "\n" + input("... ")
    return line


def chat_loop(
    llm: LLM, params: SamplingParams, system: str | None, verbose: bool, load_s: float | None = None
) -> None:
    """Read messages and commands until /exit or end of input, streaming each reply."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 (line editing and history for input())
    session = ChatSession(llm, params, system)
    while True:
        try:
            text = read_message()
        except EOFError:
            write_out("\n")
            return
        except KeyboardInterrupt:
            write_out("\nUse Ctrl + d or /bye to exit.\n")
            continue
        command = parse_command(text)
        if command is not None:
            if command.name in ("exit", "bye", "quit"):
                return
            verbose = _run_command(session, command.name, command.args, verbose)
            continue
        if not text.strip():
            continue
        try:
            for delta in session.reply(text):
                write_out(delta)
            write_out("\n\n")
        except KeyboardInterrupt:
            write_out("\n")
            continue
        except PyBitNetError as e:
            err.print(f"[red]Error:[/red] {escape(str(e))}")
            continue
        if verbose and session.last_output is not None:
            print_timings(session.last_output.timings, load_s)
            load_s = None


def _run_command(session: ChatSession, name: str, args: str, verbose: bool) -> bool:
    """Carry out one slash command; returns the (possibly changed) verbose flag."""
    if name in ("reset", "clear"):
        session.reset()
        write_out("Cleared session context.\n")
    elif name in ("help", "?"):
        write_out(HELP + "\n")
    elif name == "show":
        p = session.params
        write_out(
            f"temperature {p.temperature}, top_k {p.top_k}, top_p {p.top_p}, min_p {p.min_p}, "
            f"repetition_penalty {p.repetition_penalty}, presence_penalty {p.presence_penalty}, "
            f"frequency_penalty {p.frequency_penalty}, seed {p.seed}, max_tokens {p.max_tokens}\n"
            f"system: {session.system or '(none)'}\n"
        )
    elif name == "set":
        key, _, value = args.partition(" ")
        if key in ("verbose", "quiet"):
            write_out(f"Set '{key}' mode.\n")
            return key == "verbose"
        try:
            write_out(session.set(key, value.strip()) + "\n")
        except PyBitNetError as e:
            err.print(f"[red]Error:[/red] {escape(str(e))}")
    else:
        write_out(f"Unknown command '/{name}'. Type /? for help\n")
    return verbose
