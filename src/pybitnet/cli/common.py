"""Options and helpers the generation verbs share: llama.cpp flag names, model loading, errors, timings."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ..engine import LLM, SamplingParams, Timings
from ..engine.default_model import model_or_default
from ..errors import PyBitNetError

err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per message: greppable `file:line:`

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Hub id (org/name) or local model directory.", show_default=False),
]
NPredict = Annotated[
    int, typer.Option("-n", "--n-predict", help="Tokens to generate at most; -1: until the end.")
]
Temp = Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens; 0 disables.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1]; 1 disables.")]
MinP = Annotated[
    float, typer.Option("--min-p", help="Drop tokens below min-p × the top probability; 0 disables.")
]
RepeatPenalty = Annotated[
    float, typer.Option("--repeat-penalty", help="Penalty on tokens seen already; 1 disables.")
]
PresencePenalty = Annotated[
    float, typer.Option("--presence-penalty", help="OpenAI presence penalty in [-2, 2].")
]
FrequencyPenalty = Annotated[
    float, typer.Option("--frequency-penalty", help="OpenAI frequency penalty in [-2, 2].")
]
Seed = Annotated[int, typer.Option("-s", "--seed", help="Sampling seed; -1: random.")]
Stop = Annotated[
    list[str] | None,
    typer.Option("-r", "--reverse-prompt", "--stop", help="Stop when this text appears (repeatable)."),
]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-sequence tokens.")]
TokenHealing = Annotated[
    bool,
    typer.Option(
        "--token-healing",
        help="Back up over the prompt's last token and let the first new token re-cover its text "
        "(for prompts that end mid-token, like a bare ':').",
    ),
]
CtxSize = Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens; 0: the model's.")]
Threads = Annotated[
    int,
    typer.Option("-t", "--threads", help="CPU threads (the C kernels' if they run the model); 0: the cores."),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
KernelOpt = Annotated[
    str | None,
    typer.Option(
        "--kernel", help="Ternary kernel (default: the best one for the device).", show_default=False
    ),
]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32 or bfloat16.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Print timings (prompt eval and eval rates).")]
System = Annotated[
    str | None,
    typer.Option("--system", help="System prompt.", show_default=False),
]


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors pybitnet raises on purpose end the command with their message and exit status 1."""
    try:
        yield
    except PyBitNetError as e:
        err.print(f"[red]Error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None


# The flags every generation verb takes: name -> (annotation, default). A verb decorated with
# `generation_options` declares `params: SamplingParams` and `load: LoadOptions` instead and receives them.
SAMPLING_FLAGS: dict[str, tuple[Any, Any]] = {
    "n_predict": (NPredict, -1),
    "temp": (Temp, 0.8),
    "top_k": (TopK, 40),
    "top_p": (TopP, 0.95),
    "min_p": (MinP, 0.05),
    "repeat_penalty": (RepeatPenalty, 1.0),
    "presence_penalty": (PresencePenalty, 0.0),
    "frequency_penalty": (FrequencyPenalty, 0.0),
    "seed": (Seed, -1),
    "stop": (Stop, None),
    "ignore_eos": (IgnoreEos, False),
    "token_healing": (TokenHealing, False),
}
LOAD_FLAGS: dict[str, tuple[Any, Any]] = {
    "ctx_size": (CtxSize, 0),
    "threads": (Threads, 0),
    "device": (Device, "auto"),
    "kernel": (KernelOpt, None),
    "dtype": (Dtype, "auto"),
}


def sampling_params(
    n_predict: int,
    temp: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    presence_penalty: float,
    frequency_penalty: float,
    seed: int,
    stop: list[str] | None,
    ignore_eos: bool,
    token_healing: bool,
) -> SamplingParams:
    return SamplingParams(
        max_tokens=None if n_predict < 0 else n_predict,
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repeat_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=None if seed < 0 else seed,
        stop=list(stop) if stop else None,
        ignore_eos=ignore_eos,
        token_healing=token_healing,
    )


@dataclass(frozen=True)
class LoadOptions:
    """How to load the model (the LOAD_FLAGS)."""

    ctx_size: int = 0
    threads: int = 0
    device: str = "auto"
    kernel: str | None = None
    dtype: str = "auto"

    def llm(self, model: str | None, max_num_seqs: int = 1, seed: int | None = None) -> LLM:
        return LLM(
            model_or_default(model),
            device=self.device,
            threads=self.threads or None,
            kernel=self.kernel,
            dtype=self.dtype,
            max_model_len=self.ctx_size or None,
            max_num_seqs=max_num_seqs,
            seed=seed,
        )

    def load(self, model: str | None, max_num_seqs: int = 1) -> tuple[LLM, float]:
        """The model loaded for generation, and the seconds loading took."""
        start = time.perf_counter()
        llm = self.llm(model, max_num_seqs)
        return llm, time.perf_counter() - start


def generation_options(n_predict: int = -1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer verb the shared sampling and loading flags (llama.cpp's names). The verb declares
    `params: SamplingParams` and `load: LoadOptions`; its command line gets SAMPLING_FLAGS and LOAD_FLAGS
    (`-n` defaulting to `n_predict`), and invalid sampling values end the command with their message."""

    def decorate(verb: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(verb, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(verb).parameters.values()
            if p.name not in ("params", "load")
        ]
        defaults = {**SAMPLING_FLAGS, "n_predict": (NPredict, n_predict), **LOAD_FLAGS}
        flags = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
            for name, (ann, default) in defaults.items()
        ]

        @functools.wraps(verb)
        def command(**kwargs: Any) -> Any:
            sampling = {name: kwargs.pop(name) for name in SAMPLING_FLAGS}
            load = LoadOptions(**{name: kwargs.pop(name) for name in LOAD_FLAGS})
            with user_errors():
                params = sampling_params(**sampling)
            return verb(**kwargs, params=params, load=load)

        signature = inspect.Signature(own + flags)
        command.__signature__ = signature  # typer reads the command's options from here
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return command

    return decorate


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.2f}ms"
    return f"{seconds:.3f}s"


def print_timings(t: Timings, load_s: float | None = None) -> None:
    """ollama's --verbose block, on stderr."""
    lines = [("total duration", format_duration(t.total_s + (load_s or 0)))]
    if load_s is not None:
        lines.append(("load duration", format_duration(load_s)))
    lines += [
        ("prompt eval count", f"{t.prompt_tokens} token(s)"),
        ("prompt eval duration", format_duration(t.prompt_eval_s)),
        ("prompt eval rate", f"{t.prompt_tokens_per_s:.2f} tokens/s"),
        ("eval count", f"{t.generated_tokens} token(s)"),
        ("eval duration", format_duration(t.eval_s)),
        ("eval rate", f"{t.tokens_per_s:.2f} tokens/s"),
    ]
    for name, value in lines:
        err.print(f"{name + ':':<22}{value}")


# C0/C1 control characters other than tab and newline: model output shown on a terminal must not be able to
# move the cursor, clear the screen or inject escape sequences.
_TERMINAL_UNSAFE = dict.fromkeys([*range(0, 9), *range(11, 32), *range(127, 160)])


def write_out(text: str) -> None:
    """Write generated text to stdout as it comes; on a terminal, control characters are dropped."""
    if sys.stdout.isatty():
        text = text.translate(_TERMINAL_UNSAFE)
    sys.stdout.write(text)
    sys.stdout.flush()


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time (HF_HUB_CACHE, HF_HOME, ...)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_models() -> list:
    """The model repos (huggingface_hub CachedRepoInfo) in the HF cache; none if there is no cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return []
    return [r for r in info.repos if r.repo_type == "model"]
