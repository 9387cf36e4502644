"""`POST /v1/chat/completions`: messages in, a completion or an SSE stream of chunks out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lm_core.chat_templates.encoding import render_and_encode
from lm_serve.errors import APIError, bad_request, error_body
from lm_serve.generation import ClientDisconnected, Generation, PromptJob
from lm_serve.logprobs import TokenTexts, chat_logprobs, prompt_logprobs_json
from lm_serve.offload import off_loop
from lm_serve.output import (
    delta_is_empty,
    delta_json,
    finish_reason,
    merge_deltas,
    message_json,
    new_id,
    now,
    stop_ids_of,
    usage_json,
    visible_token_ids,
)
from lm_serve.parsers import DeltaMessage, ToolCallDelta
from lm_serve.protocol import ChatCompletionRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.sampling import build_gen_config
from lm_serve.state import ServerState
from lm_serve.streaming import DONE, SSEResponse, sse
from lm_serve.tool_choice import ToolPlan, make_message_stream, plan_tools

router = APIRouter(route_class=GuardedRoute)
# Arguments of ChatTemplate.render that a request's chat_template_kwargs must not replace.
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "documents", "add_generation_prompt", "special_tokens"})


@dataclass
class ChatPrompt:
    """A rendered conversation: its text (parsers look at how it ends), token ids, and the tool plan."""

    text: str
    token_ids: list[int]
    plan: ToolPlan


def render_chat(
    state: ServerState,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool,
    response_format: dict[str, Any] | None,
    chat_template_kwargs: dict[str, Any] | None,
    add_generation_prompt: bool = True,
) -> ChatPrompt:
    """Check the conversation and render it with the chat template (tools rendered unless tool_choice is none)."""
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, response_format)
    kwargs = dict(chat_template_kwargs or {})
    reserved = _RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}", param="chat_template_kwargs")
    pipe = state.pipeline
    try:
        # The template writes any BOS itself; text in the messages that spells a special token stays text.
        text, ids = render_and_encode(
            pipe.chat_template,
            pipe.tokenizer,
            messages,
            tools=plan.tools,
            add_generation_prompt=add_generation_prompt,
            allow_special_tokens_in_content=state.allow_special_tokens_in_content,
            chat_template_kwargs=kwargs,
        )
    except ValueError as exc:
        raise bad_request(exc) from None
    if not ids:
        raise APIError("the rendered prompt is empty", param="messages")
    return ChatPrompt(text, ids, plan)


def check_prompt_length(state: ServerState, prompt_ids: list[int], gen_config) -> None:
    """400 when the prompt (plus max_tokens) does not fit the context."""
    try:
        state.pipeline.resolve_gen_config(gen_config, len(prompt_ids))
    except ValueError as exc:
        raise bad_request(exc, param="messages" if "prompt" in str(exc) else None) from None


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion (OpenAI's API): streamed as SSE chunks when `stream` is true."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
    tool_choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    user_format = body.response_format.to_engine() if body.response_format else None
    prompt = await off_loop(
        request,
        render_chat,
        state,
        [m.to_dict() for m in body.messages],
        tools,
        tool_choice,
        body.parallel_tool_calls is not False,
        user_format,
        body.chat_template_kwargs,
    )
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    gen_config = build_gen_config(
        body,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=num_top,
        response_format=prompt.plan.response_format,
        model_defaults=state.pipeline.generation_defaults,
        vocab_size=state.tokenizer.vocab_size,
    )
    if body.prompt_logprobs is not None:
        gen_config = gen_config.replace(prompt_logprobs=body.prompt_logprobs)
    check_prompt_length(state, prompt.token_ids, gen_config)
    streams = [make_message_stream(prompt.plan, state, prompt.text, body.chat_template_kwargs) for _ in range(body.n)]
    gen = await Generation(state, [PromptJob(prompt.token_ids, gen_config)]).start()
    ctx = _ChatContext(state, body, gen_config, streams, num_top, prompt.token_ids)
    if body.stream:
        return SSEResponse(ctx.events(gen), gen.aclose)
    try:
        results = await gen.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(ctx.completion(results))


class _ChatContext:
    """What building one request's answer needs."""

    def __init__(self, state, body, gen_config, streams, num_top, prompt_ids) -> None:
        self.state = state
        self.body = body
        self.streams = streams
        self.num_top = num_top
        self.prompt_ids = prompt_ids
        self.num_prompt = len(prompt_ids)
        self.id = new_id("chatcmpl")
        self.created = now()
        self.texts = TokenTexts(state.tokenizer)
        self.stop_ids = stop_ids_of(state.pipeline, gen_config)
        self.include_stop = gen_config.include_stop_str_in_output

    def _logprobs(self, piece) -> dict[str, Any] | None:
        if self.num_top is None:
            return None
        ids = visible_token_ids(piece, self.stop_ids, self.include_stop)
        return {"content": chat_logprobs(ids, piece.logprobs, self.num_top, self.texts), "refusal": None}

    def completion(self, results) -> dict[str, Any]:
        choices = []
        num_completion = 0
        for index in range(self.body.n):
            result = results[index]
            if result.finish_reason == "error":
                raise APIError(result.error or "generation failed", status_code=500, type="server_error")
            num_completion += result.generate_token_len
            parsed = self.streams[index].parse(result.text)
            choices.append(
                {
                    "index": index,
                    "message": message_json(parsed),
                    "logprobs": self._logprobs(result),
                    "finish_reason": finish_reason(result.finish_reason, bool(parsed.tool_calls)),
                }
            )
        out = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": usage_json(self.num_prompt, num_completion),
            "system_fingerprint": None,
        }
        if self.body.prompt_logprobs is not None:  # vLLM's extension; every choice shares the prompt
            entries = results[0].prompt_logprobs or [None] * self.num_prompt
            out["prompt_logprobs"] = prompt_logprobs_json(
                self.prompt_ids, entries, self.body.prompt_logprobs, self.texts
            )
        return out

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.state.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.body.stream_options and self.body.stream_options.include_usage:
            chunk["usage"] = usage
        return sse(chunk)

    async def events(self, gen: Generation) -> AsyncIterator[str]:
        started: set[int] = set()
        has_calls: set[int] = set()
        num_completion: dict[int, int] = {}
        try:
            async for piece in gen:
                i = piece.index
                if i not in started:
                    started.add(i)
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield self._chunk([{**role, "finish_reason": None}])
                if piece.finish_reason == "error":
                    yield sse(error_body(piece.error or "generation failed", "server_error"))
                    return
                delta = self.streams[i].feed(piece.text)
                if piece.finish_reason is not None:
                    delta = merge_deltas(delta, self.streams[i].finish())
                if delta.tool_calls:
                    has_calls.add(i)
                num_completion[i] = piece.generate_token_len
                logprobs = self._logprobs(piece)
                reason = finish_reason(piece.finish_reason, i in has_calls)
                if delta_is_empty(delta) and reason is None and not (logprobs and logprobs["content"]):
                    continue
                parts = _openai_chunk_deltas(delta)
                for k, part in enumerate(parts):
                    choice = {
                        "index": i,
                        "delta": delta_json(part),
                        "logprobs": logprobs if k == 0 else None,
                        "finish_reason": reason if k == len(parts) - 1 else None,
                    }
                    yield self._chunk([choice])
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], usage_json(self.num_prompt, sum(num_completion.values())))
            yield DONE
        finally:
            await gen.aclose()


def _openai_chunk_deltas(delta: DeltaMessage) -> list[DeltaMessage]:
    """`delta` split as OpenAI's chunks carry it: text first, then one tool-call piece per chunk, where a call's first
    chunk has its id and name with empty arguments, and its arguments follow in the next ones."""
    parts = [DeltaMessage(delta.content, delta.reasoning_content)] if delta.content or delta.reasoning_content else []
    for call in delta.tool_calls:
        if call.id is None:
            parts.append(DeltaMessage(tool_calls=[call]))
            continue
        parts.append(DeltaMessage(tool_calls=[ToolCallDelta(call.index, call.id, call.name)]))
        if call.arguments:
            parts.append(DeltaMessage(tool_calls=[ToolCallDelta(call.index, arguments=call.arguments)]))
    return parts or [delta]
