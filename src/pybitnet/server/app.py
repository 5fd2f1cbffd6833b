"""The FastAPI application: OpenAI-compatible routes, /health, /metrics, the web chat page, API-key checks and
request counting. `create_app(load, settings)` starts loading the model (load() in a background thread) when
the app starts, so the API answers 503 until it is ready."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine import LLM
from .errors import APIError, install_error_handlers
from .generation import router as generation_router
from .schemas import ChatCompletionChunk, CompletionChunk, ErrorResponse, Health, ModelCard, ModelList
from .state import ServerSettings, ServerState

COUNTED_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})

DESCRIPTION = """OpenAI-compatible API over a BitNet b1.58 model, with continuous batching.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""


class RequestCounter:
    """Counts answered API requests by endpoint and status (a pure ASGI middleware, so streams pass through
    untouched and client disconnects still reach the route)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in COUNTED_ENDPOINTS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.state.metrics.requests.labels(scope["path"], str(status)).inc()


class APIKeyCheck:
    """With an API key set, every /v1/ request needs `Authorization: Bearer <key>` (checked before anything
    else, so a request without it learns nothing about the body it sent)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@cache
def chat_page() -> str:
    return (files("pybitnet.server") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(
    load: Callable[[], LLM],
    settings: ServerSettings,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.load_in_background(load, asyncio.get_running_loop(), on_load_failure)
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="pybitnet", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(generation_router)
    if settings.api_key:
        app.add_middleware(APIKeyCheck, api_key=settings.api_key)
    app.add_middleware(RequestCounter, state=state)
    _add_routes(app, state)
    _install_openapi(app, bool(settings.api_key))
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    unavailable = {503: {"model": ErrorResponse, "description": "Loading, failed to load, or shutting down."}}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(chat_page())

    @app.get("/health", response_model=Health, responses=unavailable, summary="Readiness")
    async def health() -> Any:
        state.require_ready()
        return Health(status="ok")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    def card() -> ModelCard:
        served = state.require_ready()
        return ModelCard(
            id=served.name,
            created=served.created,
            max_model_len=served.max_model_len,
            has_chat_template=served.llm.tokenizer.chat_template is not None,
        )

    auth = {401: {"model": ErrorResponse, "description": "Missing or wrong API key."}}

    @app.get("/v1/models", response_model=ModelList, responses={**unavailable, **auth}, summary="List models")
    async def list_models() -> Any:
        return ModelList(data=[card()])

    @app.get(
        "/v1/models/{model:path}",
        response_model=ModelCard,
        responses={**unavailable, **auth, 404: {"model": ErrorResponse, "description": "Unknown model."}},
        summary="Retrieve a model",
    )
    async def retrieve_model(model: str) -> Any:
        found = card()
        if model != found.id:
            raise APIError(
                404, f"the model {model!r} is not served here", param="model", code="model_not_found"
            )
        return found


def _install_openapi(app: FastAPI, api_key: bool) -> None:
    """The generated spec, corrected where FastAPI cannot know better: validation errors are 400s (not 422s),
    the streamed chunk schemas that the text/event-stream responses reference are added, and with an API
    key the /v1/ routes declare the bearer scheme (the check itself is APIKeyCheck)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in spec["paths"].values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)  # validation errors are 400s here
        components = spec.setdefault("components", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(unused, None)
        _, chunk_schemas = models_json_schema(
            [(ChatCompletionChunk, "serialization"), (CompletionChunk, "serialization")],
            ref_template="#/components/schemas/{model}",
        )
        for name, schema in chunk_schemas["$defs"].items():
            components.setdefault("schemas", {}).setdefault(name, schema)
        if api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            for path, operations in spec["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
