"""The bridge between asyncio request handlers and the engine: one thread drives `Engine.step()`, handlers get
each step's outputs through asyncio queues.

The engine does the continuous batching (requests join the running batch between decode steps). This module
adds what a server needs around it: admission limits (running slots plus a bounded queue; past that the caller
gets QueueFullError), cancellation of every sequence of an HTTP request at once (client gone), draining and
cancelling for shutdown, and metrics. All bookkeeping lives on the event loop's thread; the engine thread only
steps and posts each step's outputs back to the loop in one call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

from ..engine import Engine, SamplingParams, StepOutput
from .metrics import Metrics

log = logging.getLogger("pybitnet.server")


class QueueFullError(Exception):
    """Every slot is busy and the waiting queue is full."""


class DrainingError(Exception):
    """The server is shutting down and takes no new requests."""


class RequestCancelledError(Exception):
    """The server cancelled a request (shutdown) before it finished."""


class EngineFailedError(Exception):
    """The engine raised while stepping; the requests it was running are lost."""


class RequestGroup:
    """The sequences of one HTTP request (n choices of one or more prompts), read as one stream of
    (choice index, StepOutput)."""

    def __init__(self, owner: EngineLoop, request_ids: list[str], prompt_tokens: int) -> None:
        self.owner = owner
        self.request_ids = request_ids
        self.prompt_tokens = prompt_tokens
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.queue: asyncio.Queue[tuple[int, StepOutput] | BaseException] = asyncio.Queue()
        self.unfinished = set(request_ids)
        self.failure: BaseException | None = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def updates(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """Each step output of the group's sequences until all have finished; raises the group's failure
        (shutdown, engine error) instead of reporting aborted sequences."""
        remaining = len(self.request_ids)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            index, update = item
            if update.finished:
                remaining -= 1
                if update.output is not None and update.output.finish_reason == "abort":
                    raise self.failure or RequestCancelledError("the request was cancelled")
            yield index, update

    def cancel(self) -> None:
        """Abort the sequences still running (the client has gone); their slots free at the next step."""
        self.cancelled = True
        self.owner.abort(self)


class EngineLoop:
    """Drives one engine from a background thread for the requests of one event loop."""

    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.draining = False
        self._groups: dict[str, tuple[RequestGroup, int]] = {}  # request id -> (group, choice index)
        self._in_flight = 0  # sequences handed to the engine whose final output has not come back
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.watch_engine(lambda: engine.num_waiting, lambda: engine.num_running)

    @property
    def capacity(self) -> int:
        """Sequences the server holds at once: running slots plus the waiting queue."""
        return self.engine.max_num_seqs + self.max_queue

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ---- lifecycle (event loop thread) ----

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="pybitnet-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self) -> None:
        """Refuse new requests from now on (in-flight ones go on)."""
        self.draining = True

    def cancel_all(self, reason: str) -> None:
        """Abort every in-flight request; their handlers see RequestCancelledError(reason)."""
        for group in {g for g, _ in self._groups.values()}:
            group.failure = RequestCancelledError(reason)
            self.abort(group)

    # ---- requests (event loop thread) ----

    def submit(
        self, prompts: list[list[int]], params: list[SamplingParams], prompt_tokens: int
    ) -> RequestGroup:
        """Queue one sequence per (prompt, params); `prompt_tokens` counts each distinct prompt once (for
        usage and metrics). Raises DrainingError, QueueFullError, or the engine's InvalidRequestError (then
        none of them is queued)."""
        if self.draining:
            raise DrainingError("the server is shutting down")
        if self._in_flight + len(prompts) > self.capacity:
            raise QueueFullError(
                f"the server is at capacity ({self.engine.max_num_seqs} running, {self.max_queue} queued); "
                "retry later"
            )
        for p in params:
            p.validate()
        prefix = uuid.uuid4().hex
        ids = [f"{prefix}-{i}" for i in range(len(prompts))]
        group = RequestGroup(self, ids, prompt_tokens)
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params, strict=True):
                self.engine.add_request(prompt, p, request_id)
                added.append(request_id)
                self._groups[request_id] = (group, len(added) - 1)
                self._in_flight += 1
        except Exception:
            for request_id in added:
                self.engine.abort(request_id)
            self._wake.set()
            raise
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(group.prompt_tokens)
        self._wake.set()
        return group

    def abort(self, group: RequestGroup) -> None:
        for request_id in group.unfinished:
            self.engine.abort(request_id)
        self._wake.set()

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        now = time.perf_counter()
        for update in outputs:
            entry = self._groups.get(update.request_id)
            if entry is None:
                continue
            group, index = entry
            if update.delta_token_ids:
                if self.metrics is not None:
                    self.metrics.generation_tokens.inc(len(update.delta_token_ids))
                if group.first_token_at is None:
                    group.first_token_at = now
                    if self.metrics is not None:
                        self.metrics.ttft.observe(now - group.arrival)
            if update.finished:
                del self._groups[update.request_id]
                self._in_flight -= 1
                group.unfinished.discard(update.request_id)
                if group.done and not group.cancelled and group.failure is None and self.metrics is not None:
                    self.metrics.latency.observe(now - group.arrival)
            group.queue.put_nowait((index, update))

    def _fail(self, error: EngineFailedError) -> None:
        """After an engine error: fail every in-flight request and abort its sequences in the engine."""
        for request_id, (group, _) in list(self._groups.items()):
            if group.failure is None:
                group.failure = error
                group.queue.put_nowait(error)
            self.engine.abort(request_id)
        self._in_flight -= len(self._groups)
        self._groups.clear()
        self._wake.set()

    # ---- the engine thread ----

    def _run(self) -> None:
        assert self._loop is not None
        while not self._stopping:
            self._wake.clear()
            if not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                log.exception("the engine failed while stepping; failing its in-flight requests")
                failure = EngineFailedError(f"the engine failed: {type(e).__name__}: {e}")
                self._post(self._fail, failure)
                continue
            if outputs:
                self._post(self._dispatch, outputs)

    def _post(self, fn, arg) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop has closed: nobody is left to read the outputs
            self._stopping = True
