"""`pybitnet serve [MODEL]`: the OpenAI-compatible HTTP server (and web chat page) over one model."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.markup import escape

from ..engine.default_model import model_or_default
from ..errors import InvalidRequestError
from .common import CtxSize, Device, Dtype, KernelOpt, LoadOptions, ModelArg, Threads, err, user_errors


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PYBITNET_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1/ requests.",
            show_default=False,
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            "--alias",
            help="Model id clients send and /v1/models lists (default: MODEL as given, or 'default').",
            show_default=False,
        ),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel", "--max-num-seqs", help="Sequences decoded together at most (batch slots)."
        ),
    ] = 8,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Sequences that may wait for a slot; beyond that: 429.")
    ] = 64,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="New tokens one request may ask for at most; 0: the context.")
    ] = 0,
    shutdown_timeout: Annotated[
        float,
        typer.Option("--shutdown-timeout", help="Seconds in-flight requests get to finish at shutdown."),
    ] = 10.0,
    seed: Annotated[
        int, typer.Option("-s", "--seed", help="Seed for requests without one; -1: random.")
    ] = -1,
    ctx_size: CtxSize = 0,
    threads: Threads = 0,
    device: Device = "auto",
    kernel: KernelOpt = None,
    dtype: Dtype = "auto",
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models),
    with /health, /metrics and a web chat page at /."""
    with user_errors():
        from ..engine import LLM
        from ..hub import resolve_model

        _check_limits(parallel, max_queue, max_tokens, shutdown_timeout, log_level)
        named = model
        model = str(model_or_default(model))
        resolve_model(model)  # fail now, not in the background, if the model is not there
        try:
            from ..server import ServerSettings, build_server
        except ImportError as e:
            raise InvalidRequestError(
                f"the server needs fastapi, uvicorn and prometheus_client ({e}); pip install them"
            ) from None
        settings = ServerSettings(
            model_name=served_model_name or (model.rstrip("/") if named else "default"),
            max_queue=max_queue,
            max_tokens=max_tokens or None,
            api_key=api_key or None,
            shutdown_timeout=shutdown_timeout,
        )

        options = LoadOptions(ctx_size, threads, device, kernel, dtype)

        def load() -> LLM:
            return options.llm(model, max_num_seqs=parallel, seed=None if seed < 0 else seed)

        logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
        server = build_server(load, settings, host, port, log_level)
        err.print(f"serving {escape(settings.model_name)} on http://{host}:{port} (loading the model...)")
        server.run()
        if server.state.error is not None:
            err.print(f"[red]Error:[/red] the model failed to load: {escape(str(server.state.error))}")
            raise typer.Exit(1)


def _check_limits(
    parallel: int, max_queue: int, max_tokens: int, shutdown_timeout: float, log_level: str
) -> None:
    if parallel < 1:
        raise InvalidRequestError(f"--parallel must be >= 1, got {parallel}")
    if max_queue < 0:
        raise InvalidRequestError(f"--max-queue must be >= 0, got {max_queue}")
    if max_tokens < 0:
        raise InvalidRequestError(f"--max-tokens must be >= 0, got {max_tokens}")
    if shutdown_timeout < 0:
        raise InvalidRequestError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    if log_level not in ("debug", "info", "warning", "error"):
        raise InvalidRequestError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
