"""A chat conversation with history, and the REPL commands that change it (/reset, /set temp 0.5, ...)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import InvalidRequestError
from .llm import LLM
from .outputs import RequestOutput
from .params import SamplingParams

# /set names (llama.cpp flag names and SamplingParams names) -> SamplingParams field
SETTINGS = {
    "temp": "temperature",
    "temperature": "temperature",
    "top_k": "top_k",
    "top-k": "top_k",
    "top_p": "top_p",
    "top-p": "top_p",
    "min_p": "min_p",
    "min-p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "repeat-penalty": "repetition_penalty",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "n_predict": "max_tokens",
    "num_predict": "max_tokens",
    "max_tokens": "max_tokens",
}
INT_FIELDS = {"top_k", "seed", "max_tokens"}


@dataclass
class Command:
    """A line that starts with '/': its name and the rest of the line."""

    name: str
    args: str


def parse_command(line: str) -> Command | None:
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, args = stripped[1:].partition(" ")
    return Command(name.lower(), args.strip())


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.history: list[dict[str, str]] = []
        self.last_output: RequestOutput | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def set(self, name: str, value: str) -> str:
        """Change a sampling setting (or the system prompt) from text; a message saying what changed."""
        if name == "system":
            self.system = value or None
            return "Set system message." if value else "Cleared system message."
        field = SETTINGS.get(name.lower())
        if field is None:
            known = ", ".join(sorted({"system", *SETTINGS}))
            raise InvalidRequestError(f"unknown setting {name!r}; known settings: {known}")
        try:
            parsed: int | float | None = int(value) if field in INT_FIELDS else float(value)
        except ValueError:
            kind = "an integer" if field in INT_FIELDS else "a number"
            raise InvalidRequestError(f"{name} needs {kind}, got {value!r}") from None
        if field == "max_tokens" and parsed is not None and parsed < 0:
            parsed = None
        if field == "seed" and parsed is not None and parsed < 0:
            parsed = None
        self.params = dataclasses.replace(self.params, **{field: parsed})
        return f"Set {field} to {parsed}."

    def reply(self, text: str) -> Iterator[str]:
        """Send a user message and yield the reply's text deltas. The turn joins the history only when the
        reply completes; an interrupted or failed turn leaves the history as it was."""
        messages = [*self.messages, {"role": "user", "content": text}]
        stream = self.llm.stream_chat(messages, self.params)
        try:
            yield from stream
        finally:
            stream.close()
        self.last_output = stream.output
        if stream.output is not None:
            self.history += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": stream.output.text},
            ]
