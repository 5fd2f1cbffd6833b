"""A model's tokenizer, read from its directory the way transformers' AutoTokenizer reads a fast tokenizer.

tokenizer.json (the `tokenizers` file) does the encoding, including the BOS its post-processor adds;
tokenizer_config.json / special_tokens_map.json name the special tokens; chat_template.jinja or
tokenizer_config.json hold the chat template; generation_config.json and config.json list the ids that end a
generation.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as FastTokenizer

from ..errors import TokenizerError
from .chat_template import Message, render_chat

NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# End-of-turn tokens of common chat formats: generation stops on them when the vocabulary has them as special
# tokens, even if a config forgets to list them (Llama 3's <|eot_id|> is the usual case).
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} (the "default" one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


class Tokenizer:
    """Encode, decode, render chat templates, and know which ids end a generation."""

    def __init__(
        self,
        tokenizer: FastTokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self.special_tokens.get("eos_token"))
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self._special_contents = frozenset(specials)
        stops = set(eos_token_ids)
        stops.update(i for i in (self.eos_token_id,) if i is not None)
        stops.update(self._tok.token_to_id(t) for t in END_OF_TURN_TOKENS if t in specials)
        self.stop_token_ids: frozenset[int] = frozenset(stops)

    @classmethod
    def from_dir(cls, path: str | Path, model_eos_token_id: int | list[int] | None = None) -> Tokenizer:
        """Load a model directory's tokenizer files; `model_eos_token_id` is config.json's eos_token_id."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(
                f"{path} has no tokenizer.json; pybitnet needs the fast-tokenizer file "
                "(transformers' tokenizer.save_pretrained(dir) writes one)"
            )
        try:
            tok = FastTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{tok_file} is not a valid tokenizers file: {e}") from None
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        specials = {}
        for name in NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if content is not None:
                specials[name] = content
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
        generation = _read_json(path / "generation_config.json")
        eos = _ids(generation.get("eos_token_id")) + _ids(model_eos_token_id)
        return cls(tok, specials, template, eos)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens runs the tokenizer's post-processor (Llama 3's BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text (special tokens included; a partial UTF-8 character shows as U+FFFD)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Every id's text, as `token_text` gives it (decoded once, in one batch call)."""
        return self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)

    def heal(self, ids: list[int]) -> tuple[list[int], str, list[int]]:
        """Token healing: (the prompt without its last token, that token's text, the ids whose text starts
        with it). Nothing to heal — one token, or a last token that is special — gives (ids, "", [])."""
        if len(ids) < 2 or self._tok.id_to_token(ids[-1]) in self._special_contents:
            return ids, "", []
        full = self.decode(ids, skip_special_tokens=False)
        head = self.decode(ids[:-1], skip_special_tokens=False)
        tail = full[len(head) :]
        if not tail or not full.startswith(head):
            return ids, "", []
        allowed = [i for i, text in enumerate(self.token_texts) if text.startswith(tail)]
        return ids[:-1], tail, allowed

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """The chat prompt for `messages`, as transformers' apply_chat_template renders it; with tokenize=True
        its ids (encoded without adding special tokens: the template writes them)."""
        source = chat_template or self.chat_template
        if source is None:
            raise TokenizerError(
                "this model has no chat template (no chat_template.jinja and none in tokenizer_config.json); "
                "pass one as chat_template=..., or send the prompt as plain text for completion"
            )
        text = render_chat(source, messages, self.special_tokens, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text
