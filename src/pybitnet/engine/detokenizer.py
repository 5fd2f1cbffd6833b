"""Incremental detokenization: token ids come in one at a time, text goes out in deltas that never split a
character.

Decoding one token alone is wrong twice over: a byte-level token may hold part of a UTF-8 character, and
SentencePiece-style decoders drop the leading space of the first token they see. So each new token is decoded
together with a few tokens before it, and the delta is the text past what those earlier tokens decode to; a
delta that would end in an incomplete character (U+FFFD) is held back until the character completes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

# Prompt tokens decoded with the first generated ones, so the first delta gets its leading space right.
PROMPT_CONTEXT = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already emitted
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """The new text that `token_id` completes ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


def find_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """The earliest (index, stop string) occurring in text at or after `start` (the caller passes the first
    index a newly added delta can complete a stop at)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string: text a stream must hold back, since
    the next tokens may complete the stop (and stop strings are cut from the output)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
