"""Chat templates rendered with jinja2 the way transformers' `apply_chat_template` renders them.

The environment matches transformers': a sandbox (templates come from downloaded files), trim_blocks and
lstrip_blocks, the loopcontrols extension, a `generation` block tag, a `tojson` that does not escape HTML,
and the globals `raise_exception` and `strftime_now`. The template sees `messages`, `add_generation_prompt`,
`tools`, `documents` and the tokenizer's named special tokens (bos_token, eos_token, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidRequestError, TokenizerError

Message = dict[str, Any]


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; it renders its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 reads this class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template is not valid jinja (line {e.lineno}): {e.message}") from None


def validate_messages(messages: Any) -> list[Message]:
    """A list of {"role": str, "content": ...} dicts; None-valued keys dropped (as transformers does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidRequestError(
                f"message {i} must be a dict with a string 'role' and a 'content', got {m!r}"
            )
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_chat(
    source: str,
    messages: list[Message],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """The prompt text `source` renders for `messages` (what transformers' apply_chat_template(tokenize=False)
    returns)."""
    template = compile_template(source)
    try:
        return template.render(
            messages=validate_messages(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**special_tokens, **kwargs},
        )
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template failed to render these messages: {e}") from None
