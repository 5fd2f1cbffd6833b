"""Records -> token ids and loss masks, with the model's own tokenizer and chat template.

Loss masks come from character spans: the text is rendered once, the spans that are trained on (the whole
text; the completion; each assistant turn) are located in it, and a token is trained on when it overlaps a
span. Tokenizing the whole text at once keeps the ids exactly those the model sees at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .errors import DataError

IGNORE_INDEX = -100


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json says: special tokens and the chat template."""

    tokenizer: Any
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"no tokenizer.json in {path}; set `tokenizer` to a directory that holds one")
        tokenizer = Tokenizer.from_file(str(tok_file))
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizer, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")), template)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise ConfigError("the tokenizer has no chat_template; conversational data needs one")
        return _compiled_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_spans(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """Token ids of `text` (no special tokens added) and, per token, whether it overlaps a span (a token
        that straddles a span's start, like " Hello" after "Assistant:", is trained on)."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        trained = [any(start < hi and end > lo for lo, hi in spans) for start, end in enc.offsets]
        return list(enc.ids), trained


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


_TEMPLATES: dict[str, Any] = {}


def _compiled_template(source: str):
    if source not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def record_kind(record: dict[str, Any], text_field: str) -> str:
    """Which TRL dataset format a record is in: "text", "messages" or "prompt_completion"."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    raise DataError(
        f"record has none of the fields {text_field!r}, 'messages', or 'prompt' + 'completion' "
        f"(keys: {', '.join(map(str, record)) or 'none'})"
    )


def tokenize_record(
    record: dict[str, Any], tok: TextTokenizer, text_field: str = "text"
) -> tuple[list[int], list[int]]:
    """(input token ids, labels) of one record; labels are the ids where the loss applies, else -100.

    Labels are aligned with the ids (not shifted): the trainer shifts them when it makes next-token targets.
    """
    (result,) = tokenize_records([record], tok, text_field)
    if isinstance(result, DataError):
        raise result
    return result


def tokenize_records(
    records: list[Any], tok: TextTokenizer, text_field: str = "text"
) -> list[tuple[list[int], list[int]] | DataError]:
    """`tokenize_record` of each record, or the DataError it raises (a record may already be one). Plain-text
    records are encoded in one `encode_batch` call, which the tokenizers library spreads over every core."""
    out: list[Any] = [None] * len(records)
    plain: dict[int, str] = {}
    for i, record in enumerate(records):
        try:
            if isinstance(record, DataError):
                raise record
            kind = record_kind(record, text_field)
            if kind == "text":
                plain[i] = _plain_text(record, text_field)
            elif kind == "prompt_completion":
                out[i] = _labels(*_prompt_completion(record["prompt"], record["completion"], tok))
            else:
                out[i] = _labels(*_messages(record["messages"], tok))
        except DataError as e:
            out[i] = e
    if plain:
        encodings = tok.tokenizer.encode_batch(list(plain.values()), add_special_tokens=False)
        for i, enc in zip(plain, encodings, strict=True):
            out[i] = _labels(*_add_bos_eos(tok, enc.ids, [True] * len(enc.ids)))  # plain text: every token
    return out


def _labels(ids: list[int], trained: list[bool]) -> tuple[list[int], list[int]]:
    return ids, [i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)]


def _plain_text(record: dict[str, Any], text_field: str) -> str:
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"field {text_field!r} must be a string, got {type(text).__name__}")
    return text


def _add_bos_eos(tok: TextTokenizer, ids: list[int], trained: list[bool]) -> tuple[list[int], list[bool]]:
    if tok.bos_id is not None:
        ids, trained = [tok.bos_id, *ids], [False, *trained]
    if tok.eos_id is not None:
        ids, trained = [*ids, tok.eos_id], [*trained, True]
    return ids, trained


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"every message needs string 'role' and 'content' fields, got {m!r}")
    return messages


def _prompt_completion(prompt: Any, completion: Any, tok: TextTokenizer) -> tuple[list[int], list[bool]]:
    """Standard (two strings) or conversational (two message lists) prompt + completion: loss on the
    completion only."""
    if isinstance(prompt, str) and isinstance(completion, str):
        text = prompt + completion
        ids, trained = tok.encode_spans(text, [(len(prompt), len(text))])
        return _add_bos_eos(tok, ids, trained)
    prompt_msgs, completion_msgs = _check_messages(prompt), _check_messages(completion)
    prefix = tok.render_chat(prompt_msgs, add_generation_prompt=True)
    text = tok.render_chat(prompt_msgs + completion_msgs)
    if not text.startswith(prefix):
        prefix = tok.render_chat(prompt_msgs)
    return tok.encode_spans(text, [(len(prefix), len(text))])


def _messages(messages: Any, tok: TextTokenizer) -> tuple[list[int], list[bool]]:
    """A conversation rendered with the chat template; loss on the assistant turns only.

    The span of assistant turn i runs from the end of the rendering of messages[:i] with the generation prompt
    to the end of the rendering of messages[:i+1] (it includes the end-of-turn token the model must learn)."""
    messages = _check_messages(messages)
    text = tok.render_chat(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        through = tok.render_chat(messages[: i + 1])
        if not text.startswith(through) or not through.startswith(before):
            raise DataError(
                "the chat template does not render conversations prefix by prefix; cannot mask turns"
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise DataError("conversation has no assistant message to train on")
    return tok.encode_spans(text, spans)
