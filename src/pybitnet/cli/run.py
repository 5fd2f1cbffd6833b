"""`pybitnet run [MODEL] [PROMPT]`: one completion streamed to the terminal; interactive without a prompt."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..engine.default_model import model_or_default, split_model_and_prompt
from ..errors import InvalidRequestError
from .chat import chat_loop
from .common import (
    CtxSize,
    Device,
    Dtype,
    FrequencyPenalty,
    IgnoreEos,
    KernelOpt,
    MinP,
    ModelArg,
    NPredict,
    PresencePenalty,
    RepeatPenalty,
    Seed,
    Stop,
    System,
    Temp,
    Threads,
    TopK,
    TopP,
    Verbose,
    load_llm,
    print_timings,
    sampling_params,
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
    n_predict: NPredict = -1,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = -1,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    ctx_size: CtxSize = 0,
    threads: Threads = 0,
    device: Device = "auto",
    kernel: KernelOpt = None,
    dtype: Dtype = "auto",
    verbose: Verbose = False,
) -> None:
    """Run a model on a prompt and stream the reply (the chat template is applied if the model has one)."""
    with user_errors():
        params = sampling_params(
            n_predict,
            temp,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            stop,
            ignore_eos,
        )
        model, prompt = split_model_and_prompt(model, prompt)
        model = str(model_or_default(model))
        if prompt is None and not interactive and not sys.stdin.isatty():
            prompt = sys.stdin.read()
        if prompt is not None and not prompt.strip() and not interactive:
            raise InvalidRequestError("the prompt is empty")
        llm, load_s = load_llm(model, ctx_size, threads, device, kernel, dtype)
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
