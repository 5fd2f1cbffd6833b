"""`pybitnet run [MODEL] [PROMPT]`: one completion streamed to the terminal; interactive without a prompt."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..engine import SamplingParams
from ..engine.default_model import model_or_default, split_model_and_prompt
from ..errors import InvalidRequestError
from .chat import chat_loop
from .common import (
    LoadOptions,
    ModelArg,
    System,
    Verbose,
    generation_options,
    print_timings,
    user_errors,
    write_out,
)

PromptArg = Annotated[
    str | None,
    typer.Argument(
        help="The prompt; without one, read it from piped stdin or start a chat.", show_default=False
    ),
]


def register(app: typer.Typer) -> None:
    app.command("run")(run)


@generation_options(n_predict=-1)
def run(
    model: ModelArg = None,
    prompt: PromptArg = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")
    ] = False,
    interactive: Annotated[
        bool, typer.Option("-i", "--interactive", help="Chat, even with piped stdin.")
    ] = False,
    system: System = None,
    verbose: Verbose = False,
    *,
    params: SamplingParams,
    load: LoadOptions,
) -> None:
    """Run a model on a prompt and stream the reply (the chat template is applied if the model has one)."""
    with user_errors():
        model, prompt = split_model_and_prompt(model, prompt)
        model = str(model_or_default(model))
        if prompt is None and not interactive and not sys.stdin.isatty():
            prompt = sys.stdin.read()
        if prompt is not None and not prompt.strip() and not interactive:
            raise InvalidRequestError("the prompt is empty")
        llm, load_s = load.load(model)
        if prompt is None or interactive:
            chat_loop(llm, params, system, verbose, load_s)
            return
        if raw or llm.tokenizer.chat_template is None:
            stream = llm.stream(prompt, params)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            stream = llm.stream_chat(messages, params)
        for delta in stream:
            write_out(delta)
        write_out("\n")
        if verbose and stream.output is not None:
            print_timings(stream.output.timings, load_s)
