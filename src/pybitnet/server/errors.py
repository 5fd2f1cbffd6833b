"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure the API
reports: our own, FastAPI's validation errors, unknown routes and unexpected exceptions."""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthError, InvalidRequestError, TokenizerError

log = logging.getLogger("pybitnet.server")

# The error type OpenAI reports with each status code.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# Names pydantic puts in an error's location for the member of a union that failed (str, list[int],
# constrained-str, TextPart...): not fields, so they are left out of `param`.
UNION_TAG = re.compile(r"^(str|int|float|bool|(list|dict|tuple)\[.*\]|constrained-.*|function-.*|[A-Z]\w*)$")

# Sampling fields SamplingParams.validate names at the start of its messages.
SAMPLING_FIELDS = frozenset(
    (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
        "min_tokens",
        "seed",
        "logprobs",
        "stop",
        "stop_token_ids",
    )
)


class APIError(Exception):
    """A failure to report to the client with an HTTP status and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = error_type or ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        """The error as a server-sent event, for a stream whose 200 header is already sent."""
        return f"data: {json.dumps(self.body())}\n\n"


def from_request_error(e: InvalidRequestError | TokenizerError, param: str | None = None) -> APIError:
    """A 400 for a request the engine, the sampler or the chat template refused."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        first = str(e).split(" ", 1)[0]
        return APIError(400, str(e), param=first if first in SAMPLING_FIELDS else param)
    return APIError(400, str(e), param=param)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "the request body is invalid")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not UNION_TAG.match(str(p))]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return APIError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    where = ".".join(loc)
    message = f"{where}: {first.get('msg')}" if where else f"request body: {first.get('msg')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=where or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}").response()
