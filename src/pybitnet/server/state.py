"""What one running server knows: its settings, its metrics, and its lifecycle — loading (the model loads in a
background thread while the API already answers 503), ready, draining (shutdown) or failed."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..engine import LLM
from .errors import APIError
from .metrics import Metrics
from .scheduler import EngineLoop

log = logging.getLogger("pybitnet.server")

SHUTDOWN_MESSAGE = "the server is shutting down"


@dataclass
class ServerSettings:
    """model_name: the id clients send as `model` (and GET /v1/models lists).
    max_queue: sequences that may wait for a slot beyond the running ones (more: 429).
    max_tokens: the most new tokens one request may ask for (None: up to the context).
    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>`.
    shutdown_timeout: seconds in-flight requests get to finish at shutdown before they are cancelled."""

    model_name: str
    max_queue: int = 64
    max_tokens: int | None = None
    api_key: str | None = None
    shutdown_timeout: float = 10.0


@dataclass
class ServedModel:
    name: str
    llm: LLM
    loop: EngineLoop
    max_model_len: int
    max_tokens: int | None
    created: int


class ServerState:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.status = "loading"
        self.error: str | None = None
        self.served: ServedModel | None = None

    def require_ready(self) -> ServedModel:
        """The served model, or the 503 a request gets while it loads, after it failed, or at shutdown."""
        if self.status == "ready" and self.served is not None:
            return self.served
        if self.status == "loading":
            raise APIError(503, "the model is loading; retry shortly", code="model_loading")
        if self.status == "draining":
            raise APIError(503, SHUTDOWN_MESSAGE, code="server_shutting_down")
        raise APIError(503, f"the model failed to load: {self.error}", code="model_load_failed")

    # ---- lifecycle ----

    def load_in_background(
        self,
        load: Callable[[], LLM],
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        def work() -> None:
            try:
                llm = load()
            except BaseException as e:
                log.error("loading the model failed: %s", e)
                loop.call_soon_threadsafe(self._failed, e, on_failure)
                return
            loop.call_soon_threadsafe(self._ready, llm, loop)

        threading.Thread(target=work, name="pybitnet-load", daemon=True).start()

    def _ready(self, llm: LLM, loop: asyncio.AbstractEventLoop) -> None:
        if self.status != "loading":  # shut down while loading
            return
        engine_loop = EngineLoop(llm.engine, self.settings.max_queue, self.metrics)
        engine_loop.start(loop)
        self.served = ServedModel(
            name=self.settings.model_name,
            llm=llm,
            loop=engine_loop,
            max_model_len=llm.engine.max_model_len,
            max_tokens=self.settings.max_tokens,
            created=int(time.time()),
        )
        self.status = "ready"
        log.info("model %s ready", self.settings.model_name)

    def _failed(self, error: BaseException, on_failure: Callable[[BaseException], None] | None) -> None:
        self.status = "failed"
        self.error = str(error) or type(error).__name__
        if on_failure is not None:
            on_failure(error)

    def begin_shutdown(self) -> None:
        """Take no new requests; cancel the ones still running after settings.shutdown_timeout seconds."""
        if self.status in ("draining", "failed"):
            return
        self.status = "draining"
        if self.served is None:
            return
        engine_loop = self.served.loop
        engine_loop.drain()
        if engine_loop.in_flight:
            log.info(
                "waiting up to %gs for %d sequence(s) to finish",
                self.settings.shutdown_timeout,
                engine_loop.in_flight,
            )
            asyncio.get_running_loop().call_later(
                self.settings.shutdown_timeout, engine_loop.cancel_all, SHUTDOWN_MESSAGE
            )

    def close(self) -> None:
        """Stop the engine thread (after the last request has ended)."""
        if self.status != "failed":
            self.status = "draining"
        if self.served is not None:
            self.served.loop.stop()
