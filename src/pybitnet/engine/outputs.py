"""What generation returns: plain dataclasses (as vLLM's) shared by the Python API, CLI and server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token under the model (before penalties, temperature and filters), its rank
    among all tokens (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str


@dataclass
class Timings:
    """Wall-clock seconds of one request. Prompt evaluation is the prefill; evaluation is everything after it
    (sampling and the decode steps), as ollama's --verbose reports them."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_s: float = 0.0
    prompt_eval_s: float = 0.0
    eval_s: float = 0.0
    first_token_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.queue_s + self.prompt_eval_s + self.eval_s

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_eval_s if self.prompt_eval_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.eval_s if self.eval_s > 0 else 0.0


@dataclass
class RequestOutput:
    """The result of one request. `text` excludes the stop string (unless asked) and, by default, special
    tokens; `token_ids` are every generated id, including an end-of-sequence token that stopped generation.
    finish_reason: "stop" (end-of-sequence token or stop string), "length" (max_tokens or the context is full)
    or "abort" (cancelled); stop_reason names the stop string or token id that ended it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    timings: Timings = field(default_factory=Timings)


@dataclass
class StepOutput:
    """What one engine step did for one request: the text and tokens it added since the previous step (text
    that may still turn out to begin a stop string is held back until it is decided)."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    delta_logprobs: list[dict[int, Logprob]] | None
    finished: bool
    output: RequestOutput | None = None  # set when finished
