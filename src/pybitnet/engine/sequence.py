"""One request's state inside the engine: its tokens, text, stop conditions, penalties and timings."""

from __future__ import annotations

import time

import torch

from .detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from .outputs import Logprob, RequestOutput, StepOutput, Timings
from .params import SamplingParams
from .tokenizer import Tokenizer


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_model_len: int,
        healing: tuple[str, list[int]] = ("", []),
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_model_len = max_model_len
        self.stop_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else tokenizer.stop_token_ids
        )
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.output_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.slot: int | None = None
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # [V] bool: prompt and output tokens (repetition penalty)
        self.counts: torch.Tensor | None = None  # [V] int: output token counts (presence/frequency penalties)
        # token healing: the text of the prompt token backed over (not emitted again) and the ids the first
        # new token may be
        self._heal_text, self._heal_ids = healing
        self._emitted_text = 0
        self._emitted_tokens = 0
        self.timings = Timings(prompt_tokens=len(prompt_ids))
        self._arrival = time.perf_counter()
        self._prefill_end = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def start(self, slot: int, vocab_size: int, device: torch.device) -> None:
        """Called when the sequence gets a slot: set up its generator and penalty state on `device`."""
        self.slot = slot
        self.timings.queue_s = time.perf_counter() - self._arrival
        if self.params.seed is not None:
            self.generator = torch.Generator(device).manual_seed(self.params.seed)
        if self.params.uses_penalties:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor([i for i in self.prompt_ids if i < vocab_size], dtype=torch.long)] = True
            self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)

    def prefilled(self, seconds: float) -> None:
        self.timings.prompt_eval_s = seconds
        self._prefill_end = time.perf_counter()

    def adjust_logits(self, logits: torch.Tensor) -> None:
        """Penalties, and no stop token before min_tokens, on this sequence's row of logits [V] (in place)."""
        from .sampler import apply_penalties

        if self.seen is not None and self.counts is not None:
            apply_penalties(logits, self.params, self.seen, self.counts)
        if not self.output_ids and self._heal_ids:
            allowed = torch.tensor([i for i in self._heal_ids if i < logits.shape[-1]], device=logits.device)
            kept = logits[allowed].clone()
            logits.fill_(float("-inf"))
            logits[allowed] = kept
        if len(self.output_ids) < self.params.min_tokens and self.stop_ids:
            ids = [i for i in self.stop_ids if i < logits.shape[-1]]
            logits[ids] = float("-inf")

    def append(self, token: int, logprobs: dict[int, Logprob] | None = None) -> None:
        """Add a sampled token; update text and decide whether the sequence is done."""
        if not self.output_ids:
            self.timings.first_token_s = time.perf_counter() - self._arrival
        self.output_ids.append(token)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.counts is not None and self.seen is not None and token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True
        if token in self.stop_ids and len(self.output_ids) > self.params.min_tokens:
            self.finish("stop", token)
            return
        self._add_text(self.detokenizer.add(token))
        if self.finished:
            return
        max_tokens = self.params.max_tokens
        if (
            max_tokens is not None and len(self.output_ids) >= max_tokens
        ) or self.num_tokens >= self.max_model_len:
            self.finish("length")

    def _add_text(self, delta: str) -> None:
        if self._heal_text:  # the prompt already has this text: the output starts after it
            cut = min(len(delta), len(self._heal_text))
            delta, self._heal_text = delta[cut:], self._heal_text[cut:]
        if not delta:
            return
        start = len(self.text)
        self.text += delta
        stops = self.params.stop_strings if len(self.output_ids) > self.params.min_tokens else ()
        if stops and (hit := find_stop(self.text, stops, start)) is not None:
            index, stop = hit
            self.text = self.text[: index + len(stop) if self.params.include_stop_str_in_output else index]
            self.finish_reason, self.stop_reason = "stop", stop

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        if self.finished:
            return
        if reason != "abort":
            self._add_text(self.detokenizer.flush())
        if not self.finished:
            self.finish_reason, self.stop_reason = reason, stop_reason

    def take_update(self) -> StepOutput:
        """The text, tokens and logprobs added since the previous update; text that might begin a stop string
        is held back until the sequence finishes or the text rules the stop out."""
        if self.finished and self._prefill_end:
            self.timings.eval_s = time.perf_counter() - self._prefill_end
        self.timings.generated_tokens = len(self.output_ids)
        hold = 0 if self.finished else partial_stop_len(self.text, self.params.stop_strings)
        end = max(self._emitted_text, len(self.text) - hold)
        delta_text = self.text[self._emitted_text : end]
        delta_ids = self.output_ids[self._emitted_tokens :]
        delta_logprobs = None if self.logprobs is None else self.logprobs[self._emitted_tokens :]
        self._emitted_text, self._emitted_tokens = end, len(self.output_ids)
        return StepOutput(
            self.request_id,
            delta_text,
            delta_ids,
            delta_logprobs,
            self.finished,
            self.to_output() if self.finished else None,
        )

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_ids),
            text=self.text,
            token_ids=list(self.output_ids),
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            timings=self.timings,
        )
