"""SamplingParams: how to pick tokens and when to stop, with vLLM's field names and defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InvalidRequestError

# Below this temperature sampling is greedy (argmax), as in vLLM.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Sampling and stopping controls for one request.

    max_tokens: new tokens at most (None: until a stop or the end of the context).
    temperature: 0 is greedy; top_k 0 or -1 disables top-k; top_p 1 and min_p 0 disable those filters.
    repetition_penalty divides positive (multiplies negative) logits of tokens seen in the prompt or output;
    presence_penalty / frequency_penalty subtract from logits of tokens already generated (OpenAI semantics).
    seed makes sampling reproducible per request, whatever else runs in the same batch.
    stop: strings that end generation (not included in the text unless include_stop_str_in_output);
    stop_token_ids: extra token ids that end generation, besides the model's end-of-sequence tokens
    (which ignore_eos disables). min_tokens: no stop before this many tokens.
    logprobs: also return the log-probabilities of the sampled token and of this many most likely tokens.
    token_healing: back up over the prompt's last token and make the first new token one whose text starts
    with it, so that a prompt ending mid-token (a `:` the tokenizer merges with the newline after it) is
    continued as the model saw such text in training; the returned text still continues the prompt.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    token_healing: bool = False
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field that is out of range."""
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be >= 0",
            self.temperature,
        )
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(
            _is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            "must be -1, 0 (off) or a positive integer",
            self.top_k,
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0 (1 disables it)",
            self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "must be a positive integer or None",
            self.max_tokens,
        )
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
                self.min_tokens,
            )
        _check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
            "seed",
            "must be an integer in [0, 2**64) or None",
            self.seed,
        )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"must be between 0 and {MAX_LOGPROBS}",
            self.logprobs,
        )
        healing = self.token_healing
        _check(isinstance(healing, bool), "token_healing", "must be true or false", healing)
        _check(
            all(isinstance(s, str) and s for s in self.stop_strings),
            "stop",
            "must be non-empty strings",
            self.stop,
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids or []),
            "stop_token_ids",
            "must be non-negative integers",
            self.stop_token_ids,
        )


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise InvalidRequestError(f"{name} {rule}, got {value!r}")
