"""Running the app under uvicorn with a graceful shutdown: on SIGINT/SIGTERM the server stops taking requests,
lets in-flight ones finish for up to shutdown_timeout seconds, then cancels the rest cleanly (each open stream
gets an error event and `data: [DONE]`), and exits once every connection has closed."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable

import uvicorn

from ..engine import LLM
from .app import create_app
from .state import ServerSettings, ServerState

# Extra seconds uvicorn waits after the cancellation before it drops connections that still have not closed.
CLOSE_MARGIN_S = 5.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.begin_shutdown()
        await super().shutdown(sockets)


def build_server(
    load: Callable[[], LLM],
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
) -> GracefulServer:
    """A uvicorn server for the app; `server.run()` serves until a signal (or `server.should_exit = True`).
    If loading fails, the server exits and `server.state.error` says why."""
    server: GracefulServer | None = None

    def stop_on_failure(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_load_failure=stop_on_failure)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout + CLOSE_MARGIN_S),
        access_log=log_level == "debug",
    )
    server = GracefulServer(config, app.state.server)
    return server
