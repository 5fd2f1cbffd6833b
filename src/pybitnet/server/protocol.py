"""Translation between OpenAI request/response bodies and the engine's objects: prompts to token ids, request
fields to SamplingParams (with the server's token limits), engine logprobs to OpenAI's two logprobs shapes."""

from __future__ import annotations

from ..engine import LLM, Logprob, SamplingParams
from ..errors import InvalidRequestError, TokenizerError
from .errors import APIError, from_request_error
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionLogprobs,
    CompletionRequest,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
)

# OpenAI's default max_tokens for /v1/completions; chat completions default to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def reject_unsupported(body: SamplingRequest) -> None:
    """A 400 for fields set to values pybitnet cannot honour (better than silently ignoring them)."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def completion_prompts(llm: LLM, prompt: str | list) -> list[list[int]]:
    """The token ids of each prompt of a completions request (text, ids, or a list of either)."""
    if isinstance(prompt, list) and not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    batch = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    try:
        return [llm.engine.encode_prompt(p) for p in batch]
    except InvalidRequestError as e:
        raise from_request_error(e, "prompt") from None


def _message_dict(m: ChatMessage) -> dict:
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
    message = {"role": m.role, "content": content}
    if m.name is not None:
        message["name"] = m.name
    return message


def chat_prompt(llm: LLM, messages: list[ChatMessage]) -> list[int]:
    """The conversation rendered with the model's chat template, as token ids that fit the context."""
    try:
        ids = llm.chat_prompt([_message_dict(m) for m in messages])
        return llm.engine.encode_prompt(ids)
    except (InvalidRequestError, TokenizerError) as e:
        raise from_request_error(e, "messages") from None


def max_new_tokens(
    requested: int | None, default: int | None, prompt_tokens: int, max_model_len: int, cap: int | None
) -> int:
    """The request's max_tokens checked against the context and the server's cap (400 naming the limit); an
    omitted one is the default, clipped to both."""
    room = max_model_len - prompt_tokens
    if requested is None:
        return min(x for x in (default, room, cap) if x is not None)
    if cap is not None and requested > cap:
        raise APIError(
            400,
            f"max_tokens is {requested} but this server allows at most {cap} new tokens per request",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    if requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the "
            "completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def sampling_params(
    body: SamplingRequest,
    max_tokens: int,
    choice: int,
    logprobs: int | None,
) -> SamplingParams:
    """SamplingParams for choice `choice` of the request. Choice j > 0 of a seeded request uses seed + j, so
    n choices differ and each is reproducible."""
    seed = body.seed
    if seed is not None and choice:
        seed += choice
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=seed,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=bool(body.ignore_eos),
            token_healing=bool(body.token_healing),
            min_tokens=body.min_tokens or 0,
            logprobs=logprobs,
        )
    except InvalidRequestError as e:
        raise from_request_error(e) from None


# ---- logprobs ----


def _top(entry: dict[int, Logprob], n: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= n), key=lambda x: x[1].rank)[:n]


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], n: int) -> list[TokenLogprob]:
    """OpenAI chat logprobs.content: per token its text, logprob, UTF-8 bytes and the n most likely tokens."""
    out = []
    for token, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token]
        out.append(
            TokenLogprob(
                token=chosen.decoded_token,
                logprob=chosen.logprob,
                bytes=list(chosen.decoded_token.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode())
                    )
                    for _, lp in _top(entry, n)
                ],
            )
        )
    return out


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], n: int, offset: int
) -> CompletionLogprobs:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs, text_offset); `offset` is the
    text length before the first of these tokens. top_logprobs holds the n most likely tokens and the chosen
    one, as vLLM reports them."""
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token]
        result.tokens.append(chosen.decoded_token)
        result.token_logprobs.append(chosen.logprob)
        top: dict[str, float] = {}
        for _, lp in _top(entry, n):  # tokens whose texts coincide keep the likeliest one's value
            top.setdefault(lp.decoded_token, lp.logprob)
        top.setdefault(chosen.decoded_token, chosen.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(chosen.decoded_token)
    return result
