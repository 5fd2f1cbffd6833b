"""POST /v1/completions and /v1/chat/completions: validate, submit to the engine loop, then stream server-sent
events or wait for the whole answer. A client that goes away (closed stream, dropped connection) cancels its
request, which frees its slots at the engine's next step."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from ..engine import RequestOutput, SamplingParams, StepOutput
from ..errors import InvalidRequestError
from . import protocol
from .errors import APIError, from_request_error
from .scheduler import DrainingError, EngineFailedError, QueueFullError, RequestCancelledError, RequestGroup
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    Usage,
)
from .state import ServerState

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


def _responses(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "The completion (JSON), or with stream: true server-sent events `data: {chunk}` "
            "ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}},
        },
        400: _error("Invalid request: malformed JSON or field, prompt too long, max_tokens over a limit."),
        401: _error("Missing or wrong API key (when the server has one)."),
        404: _error("Unknown model."),
        429: _error("The server is at capacity (all slots busy and the queue full); retry later."),
        500: _error("The engine failed."),
        503: _error("The model is loading, or the server is shutting down."),
    }


def _served(request: Request, model: str | None):
    state: ServerState = request.app.state.server
    served = state.require_ready()
    if model is not None and model != served.name:
        raise APIError(
            404,
            f"the model {model!r} is not served here; this server serves {served.name!r}",
            param="model",
            code="model_not_found",
        )
    return state, served


def _submit(state: ServerState, prompts: list[list[int]], params: list[SamplingParams]) -> RequestGroup:
    served = state.served
    assert served is not None
    if len(prompts) > served.loop.capacity:
        raise APIError(
            400,
            f"the request asks for {len(prompts)} sequences (prompts × n) but this server holds at most "
            f"{served.loop.capacity} at once",
            param="n",
        )
    distinct = {id(p): len(p) for p in prompts}
    try:
        return served.loop.submit(prompts, params, sum(distinct.values()))
    except QueueFullError as e:
        raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    except DrainingError as e:
        raise APIError(503, str(e), code="server_shutting_down") from None
    except InvalidRequestError as e:
        raise from_request_error(e) from None


def _failure(e: Exception) -> APIError:
    if isinstance(e, RequestCancelledError):
        return APIError(503, f"the request was cancelled: {e}", code="request_cancelled")
    return APIError(500, str(e), code="engine_error")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(group: RequestGroup, request: Request) -> list[RequestOutput] | None:
    """Every choice's final output, or None if the client disconnected first (the group is then cancelled)."""

    async def finals() -> list[RequestOutput]:
        outputs: list[Any] = [None] * len(group.request_ids)
        async for index, update in group.updates():
            if update.output is not None:
                outputs[index] = update.output
        return outputs

    work = asyncio.ensure_future(finals())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            group.cancel()
    if not work.done() or work.cancelled():
        return None
    try:
        return work.result()
    except (RequestCancelledError, EngineFailedError) as e:
        raise _failure(e) from None


def _usage(group: RequestGroup, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=group.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=group.prompt_tokens + completion_tokens,
    )


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def _stream(group: RequestGroup, events: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events():
                yield event
        except (RequestCancelledError, EngineFailedError) as e:
            yield _failure(e).sse_event()
        finally:
            # Starlette cancels this generator when the client disconnects: free the slots now.
            if not group.done:
                group.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def _ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex}", int(time.time())


# ---- /v1/completions ----


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=_responses(CompletionChunk),
    summary="Create a completion",
)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    state, served = _served(request, body.model)
    protocol.reject_unsupported(body)
    prompts = protocol.completion_prompts(served.llm, body.prompt)
    n = body.n or 1
    choices, params = [], []
    for ids in prompts:
        max_tokens = protocol.max_new_tokens(
            body.max_tokens,
            protocol.COMPLETIONS_DEFAULT_MAX_TOKENS,
            len(ids),
            served.max_model_len,
            served.max_tokens,
        )
        for j in range(n):
            choices.append(ids)
            params.append(protocol.sampling_params(body, max_tokens, j, body.logprobs))
    group = _submit(state, choices, params)
    response_id, created = _ids("cmpl")
    model = served.name
    top_n = body.logprobs

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            offsets = [0] * len(choices)
            generated = 0
            async for index, update in group.updates():
                generated += len(update.delta_token_ids)
                logprobs = None
                if top_n is not None and update.delta_logprobs is not None:
                    logprobs = protocol.completion_logprobs(
                        update.delta_token_ids, update.delta_logprobs, top_n, offsets[index]
                    )
                offsets[index] += len(update.delta_text)
                finish = update.output.finish_reason if update.output is not None else None
                if update.delta_text or logprobs is not None or finish:
                    choice = CompletionChoice(
                        index=index, text=update.delta_text, logprobs=logprobs, finish_reason=finish
                    )
                    yield _sse(
                        CompletionChunk(id=response_id, created=created, model=model, choices=[choice])
                    )
            if include_usage:
                usage = _usage(group, generated)
                yield _sse(
                    CompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage)
                )

        return _stream(group, events)

    outputs = await _collect(group, request)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    return CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index=i,
                text=out.text,
                logprobs=None
                if top_n is None or out.logprobs is None
                else protocol.completion_logprobs(out.token_ids, out.logprobs, top_n, 0),
                finish_reason=out.finish_reason,
            )
            for i, out in enumerate(outputs)
        ],
        usage=_usage(group, sum(len(o.token_ids) for o in outputs)),
    )


# ---- /v1/chat/completions ----


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_responses(ChatCompletionChunk),
    summary="Create a chat completion",
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    state, served = _served(request, body.model)
    protocol.reject_unsupported(body)
    ids = protocol.chat_prompt(served.llm, body.messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = protocol.max_new_tokens(requested, None, len(ids), served.max_model_len, served.max_tokens)
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    n = body.n or 1
    group = _submit(
        state, [ids] * n, [protocol.sampling_params(body, max_tokens, j, top_n) for j in range(n)]
    )
    response_id, created = _ids("chatcmpl")
    model = served.name

    def chunk(index: int, delta: Delta, logprobs=None, finish=None, usage=None) -> str:
        choices = (
            []
            if index < 0
            else [ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)]
        )
        return _sse(
            ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage)
        )

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            for j in range(n):
                yield chunk(j, Delta(role="assistant", content=""))
            generated = 0
            async for index, update in group.updates():
                generated += len(update.delta_token_ids)
                logprobs = _chat_delta_logprobs(update, top_n)
                if update.delta_text or logprobs is not None:
                    yield chunk(index, Delta(content=update.delta_text), logprobs)
                if update.output is not None:
                    yield chunk(index, Delta(), finish=update.output.finish_reason)
            if include_usage:
                yield chunk(-1, Delta(), usage=_usage(group, generated))

        return _stream(group, events)

    outputs = await _collect(group, request)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=out.text),
                logprobs=None
                if top_n is None or out.logprobs is None
                else ChoiceLogprobs(content=protocol.chat_logprobs(out.token_ids, out.logprobs, top_n)),
                finish_reason=out.finish_reason,
            )
            for i, out in enumerate(outputs)
        ],
        usage=_usage(group, sum(len(o.token_ids) for o in outputs)),
    )


def _chat_delta_logprobs(update: StepOutput, top_n: int | None) -> ChoiceLogprobs | None:
    if top_n is None or update.delta_logprobs is None or not update.delta_token_ids:
        return None
    return ChoiceLogprobs(
        content=protocol.chat_logprobs(update.delta_token_ids, update.delta_logprobs, top_n)
    )
