"""The engine: requests in, tokens out, with continuous batching.

Callers (the Python API, the CLI, the server) add requests at any time and from any thread, cancel them with
`abort`, and drive the engine by calling `step()` from one thread. Each step

1. takes in new requests and cancellations,
2. admits waiting requests into free cache slots (first come, first served): each prompt is prefilled in one
   forward pass and its first token sampled,
3. runs one decode step for every other running sequence together ([n, 1] tokens) and samples their next
   tokens,

and returns a StepOutput per request that made progress. A sequence that finishes or is cancelled frees its
slot for the next step, so new requests join the running batch between decode steps.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import torch

from ..errors import ContextLengthError, InvalidRequestError
from ..models import Transformer
from .cuda_graph_runner import make_runner
from .outputs import Logprob, StepOutput
from .params import SamplingParams
from .runner import ModelRunner
from .sampler import SamplingBatch, sample, top_logprobs
from .sequence import Sequence
from .tokenizer import Tokenizer


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        seed: int | None = None,
        runner: ModelRunner | None = None,
    ) -> None:
        """`runner` runs the forward passes; by default the CUDA-graph runner on a GPU and the eager
        ModelRunner elsewhere. Any object with the same interface (reserve / prefill / decode) plugs in."""
        context = model.config.max_position_embeddings
        max_model_len = context if max_model_len is None else max_model_len
        if not 1 < max_model_len <= context:
            raise InvalidRequestError(
                f"context size {max_model_len} must be between 2 and the model's context length {context}"
            )
        if max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_size = model.config.vocab_size
        self.runner = runner if runner is not None else make_runner(model, max_model_len)
        self.generator = torch.Generator(model.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._lock = threading.Lock()
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._live: set[str] = set()
        self._ids = itertools.count()

    # ---- requests (any thread) ----

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text or ids, validated: non-empty, known ids, room to generate."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
            if not ids:
                raise InvalidRequestError("the prompt is empty (no token ids)")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
                )
        else:
            raise InvalidRequestError(
                f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}"
            )
        if len(ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len} "
                "(prompt plus at least one new token); shorten the prompt or raise the context size "
                "(max_model_len; -c/--ctx-size on the command line)"
            )
        return ids

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request and return its id; it starts at the next step. Raises InvalidRequestError (or
        ContextLengthError) at once for a prompt or parameters it cannot run."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode_prompt(prompt)
        healing: tuple[str, list[int]] = ("", [])
        if params.token_healing:
            ids, heal_text, heal_ids = self.tokenizer.heal(ids)
            healing = (heal_text, heal_ids)
        with self._lock:
            request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
            if request_id in self._live:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._live.add(request_id)
            text = prompt if isinstance(prompt, str) else None
            seq = Sequence(request_id, text, ids, params, self.tokenizer, self.max_model_len, healing=healing)
            self._incoming.append(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request: the next step frees its slot and reports it with finish_reason "abort"."""
        with self._lock:
            if request_id in self._live:
                self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self.waiting) + len(self._incoming)

    # ---- stepping (one thread) ----

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._take_incoming(outputs)
        admitted = self._admit(outputs)
        decoding = [s for s in self.running.values() if s not in admitted]
        if decoding:
            self._decode(decoding, outputs)
        return outputs

    def _take_incoming(self, outputs: list[StepOutput]) -> None:
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        for seq in [s for s in self.waiting if s.request_id in aborts]:
            self.waiting.remove(seq)
            self._finish(seq, "abort", outputs)
        for seq in [s for s in self.running.values() if s.request_id in aborts]:
            self._finish(seq, "abort", outputs)

    def _finish(self, seq: Sequence, reason: str, outputs: list[StepOutput]) -> None:
        seq.finish(reason)
        self._release(seq)
        outputs.append(seq.take_update())

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.running.pop(seq.slot, None)
        with self._lock:
            self._live.discard(seq.request_id)

    def _admit(self, outputs: list[StepOutput]) -> list[Sequence]:
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            slot = next(i for i in itertools.count() if i not in self.running)
            self.runner.reserve(slot + 1)
            seq.start(slot, self.vocab_size, self.runner.device)
            self.running[slot] = seq
            t0 = time.perf_counter()
            logits = self.runner.prefill(slot, seq.prompt_ids)
            if logits.is_cuda:  # time the prefill itself, not just its launch
                torch.cuda.synchronize(logits.device)
            seq.prefilled(time.perf_counter() - t0)
            self._sample_and_append([seq], logits[None], outputs)
            admitted.append(seq)
        return admitted

    def _decode(self, decoding: list[Sequence], outputs: list[StepOutput]) -> None:
        # Rows 0..n-1 of the cache run together. A row whose sequence is not decoding now is fed a dummy
        # token at the position its next real token will overwrite (or 0 for a free slot): it loses nothing.
        n = max(self.running) + 1
        tokens, positions = [0] * n, [0] * n
        for slot, seq in self.running.items():
            positions[slot] = seq.num_tokens - 1
        for seq in decoding:
            tokens[seq.slot] = seq.last_token
        logits = self.runner.decode(tokens, positions)
        rows = torch.tensor([s.slot for s in decoding], device=logits.device)
        self._sample_and_append(decoding, logits[rows], outputs)

    def _sample_and_append(self, seqs: list[Sequence], raw: torch.Tensor, outputs: list[StepOutput]) -> None:
        logits = raw.clone()
        for i, seq in enumerate(seqs):
            seq.adjust_logits(logits[i])
        batch = SamplingBatch.from_params(
            [s.params for s in seqs], [s.generator for s in seqs], logits.shape[-1], logits.device
        )
        tokens = sample(logits, batch, self.generator)
        logprobs = self._logprobs(seqs, raw, tokens)
        for seq, token, lp in zip(seqs, tokens.tolist(), logprobs, strict=True):
            seq.append(token, lp)
            if seq.finished:
                self._release(seq)
            outputs.append(seq.take_update())

    def _logprobs(self, seqs: list[Sequence], raw: torch.Tensor, tokens: torch.Tensor) -> list:
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[dict[int, Logprob] | None] = [None] * len(seqs)
        if not wanted:
            return result
        n = max(seqs[i].params.logprobs or 0 for i in wanted)
        index = torch.tensor(wanted, device=raw.device)
        chosen, ranks, top_ids, top_values = top_logprobs(raw[index], tokens[index], n)
        text = self.tokenizer.token_text
        for j, i in enumerate(wanted):
            token = int(tokens[i])
            entry = {token: Logprob(float(chosen[j]), int(ranks[j]), text(token))}
            for rank, (tid, value) in enumerate(
                zip(top_ids[j].tolist(), top_values[j].tolist(), strict=True)
            ):
                if rank >= (seqs[i].params.logprobs or 0):
                    break
                entry.setdefault(tid, Logprob(value, rank + 1, text(tid)))
            result[i] = entry
        return result
