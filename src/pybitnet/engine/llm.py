"""`pybitnet.LLM`: load a model once, then generate, stream and chat (vLLM's LLM, in-process).

All of it runs through one Engine; requests of interleaved calls (two streams read in turns, say) share its
batch, and each call reads only its own requests' outputs.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError
from ..kernels import cpu
from ..models import Transformer
from ..models.transformer import runs_native_cpu_kernels
from .chat_template import Message
from .default_model import model_or_default
from .engine import Engine
from .outputs import RequestOutput, StepOutput
from .params import SamplingParams
from .tokenizer import Tokenizer

Prompt = str | list[int]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on GPU by default (never float16: relu² overflows it)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class TextStream:
    """Iterates over the text deltas of one request; `output` holds the full RequestOutput once it ends.
    Closing the stream early (break, or dropping it) cancels the request."""

    def __init__(self, llm: LLM, request_id: str) -> None:
        self.output: RequestOutput | None = None
        self._llm, self._request_id = llm, request_id
        self._iter = self._deltas(llm, request_id)

    def _deltas(self, llm: LLM, request_id: str) -> Iterator[str]:
        try:
            for update in llm._updates(request_id):
                if update.delta_text:
                    yield update.delta_text
                if update.output is not None:
                    self.output = update.output
        finally:
            if self.output is None:
                llm._cancel(request_id)

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()
        if self.output is None:  # also when iteration never started
            self._llm._cancel(self._request_id)

    def __del__(self) -> None:
        if self.output is None:
            with contextlib.suppress(Exception):
                self._llm._cancel(self._request_id)


def _set_threads(model: Transformer, threads: int | None) -> None:
    """Threads for running `model` (see LLM): the C kernels' pool and one torch thread when they run it,
    torch's threads otherwise; None keeps the defaults, except that torch drops to one thread beside the
    kernels."""
    if runs_native_cpu_kernels(model):
        cpu.set_num_threads(threads)
        torch.set_num_threads(1)
    elif threads is not None:
        torch.set_num_threads(threads)


class LLM:
    """A loaded model ready to generate.

    model: hub id (org/name), local directory, .gguf file, or None for the default model.
    tokenizer: a directory of tokenizer files, if not beside the weights (a .gguf carries its own).
    device: "auto", "cpu", "cuda"...
    threads: CPU threads (default: the physical cores). When the C kernels run the model (kernel "cpu" on a
    CPU) they are the kernels' own thread pool, and torch keeps one intra-op thread: its threads spin between
    their parallel regions and would take the cores from the kernels (decode ~30 % slower on two cores);
    otherwise they are torch's. kernel: ternary kernel name (None picks the best for the device).
    max_model_len: context size (default: the model's). max_num_seqs: sequences decoded together at most.
    seed: seed of the sampling of requests that have no seed of their own.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        threads: int | None = None,
        kernel: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        seed: int | None = None,
        tokenizer: str | Path | None = None,
        revision: str | None = None,
    ) -> None:
        from ..api import load_model
        from ..hub import resolve_model

        if threads is not None and threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {threads}")
        dev = pick_device(device)
        path = resolve_model(model_or_default(model), revision=revision)
        loaded = load_model(path, device=dev, dtype=pick_dtype(dtype, dev), kernel=kernel)
        _set_threads(loaded, threads)
        if tokenizer is None and path.is_file() and path.suffix == ".gguf":
            from .gguf_tokenizer import tokenizer_from_gguf  # the gguf package is needed for GGUF only

            tok = tokenizer_from_gguf(path)
        else:
            tok = Tokenizer.from_dir(tokenizer or path, loaded.config.eos_token_id)
        self._setup(loaded, tok, max_model_len, max_num_seqs, seed)
        self.model_path = path

    @classmethod
    def from_model(
        cls,
        model: Transformer,
        tokenizer: Tokenizer,
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        seed: int | None = None,
    ) -> LLM:
        """An LLM over a model and tokenizer already in memory."""
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, max_model_len, max_num_seqs, seed)
        llm.model_path = None
        return llm

    def _setup(self, model: Transformer, tokenizer: Tokenizer, max_model_len, max_num_seqs, seed) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, max_model_len, max_num_seqs, seed)
        self._mailboxes: dict[str, deque[StepOutput]] = {}

    # ---- public API ----

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); the outputs come in the order of the prompts."""
        batch = _as_prompt_list(prompts)
        all_params = _as_params_list(params, len(batch))
        ids = self._submit(batch, all_params)
        try:
            return [self._wait(i) for i in ids]
        except BaseException:  # an interrupted call (Ctrl+C) must not leave its requests running
            for request_id in ids:
                self._cancel(request_id)
            raise

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> TextStream:
        """Text deltas of one completion as they are generated; they concatenate to generate()'s text."""
        (request_id,) = self._submit([prompt], [params or SamplingParams()])
        return TextStream(self, request_id)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Reply to one conversation ([{"role", "content"}, ...]) or to each of a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.chat_prompt(c, chat_template, add_generation_prompt, **template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, params)

    def stream_chat(
        self, messages: list[Message], params: SamplingParams | None = None, chat_template: str | None = None
    ) -> TextStream:
        """The reply to a conversation as a stream of text deltas."""
        return self.stream(self.chat_prompt(messages, chat_template), params)

    def chat_prompt(
        self,
        messages: list[Message],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """The token ids of a conversation rendered with the model's chat template."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt, tokenize=True, chat_template=chat_template, **template_kwargs
        )
        assert isinstance(ids, list)
        return ids

    # ---- plumbing ----

    def _submit(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[str]:
        for p in params:
            p.validate()
        for prompt in prompts:
            self.engine.encode_prompt(prompt)  # reject a bad prompt before any of the batch starts
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            request_id = self.engine.add_request(prompt, p)
            self._mailboxes[request_id] = deque()
            ids.append(request_id)
        return ids

    def _updates(self, request_id: str) -> Iterator[StepOutput]:
        """The step outputs of one request, stepping the engine while its mailbox is empty."""
        box = self._mailboxes[request_id]
        finished = False
        try:
            while not finished:
                while not box:
                    self._step()
                update = box.popleft()
                finished = update.finished
                yield update
        finally:
            if not finished:
                self.engine.abort(request_id)
            self._mailboxes.pop(request_id, None)

    def _step(self) -> None:
        for update in self.engine.step():
            box = self._mailboxes.get(update.request_id)
            if box is not None:
                box.append(update)

    def _wait(self, request_id: str) -> RequestOutput:
        for update in self._updates(request_id):
            if update.output is not None:
                return update.output
        raise AssertionError("a request ended without a final output")

    def _cancel(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._mailboxes.pop(request_id, None)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise InvalidRequestError("no prompts given")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return [list(p) if isinstance(p, tuple) else p for p in prompts]
    raise InvalidRequestError(
        f"prompts must be a string, token ids, or a list of those; got {type(prompts).__name__}"
    )


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
