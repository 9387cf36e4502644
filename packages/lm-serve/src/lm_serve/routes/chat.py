"""`POST /v1/chat/completions`: messages in, a completion or an SSE stream of chunks out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from lm_core.async_pipeline import RenderedPrompt
from lm_core.multimodal import has_media
from lm_core.response import Response as Piece
from lm_serve.errors import APIError, bad_request
from lm_serve.generation import ClientDisconnected, Generation, prepare_job
from lm_serve.logprobs import TokenTexts, chat_logprobs, prompt_logprobs_json
from lm_serve.offload import off_loop
from lm_serve.output import delta_is_empty, delta_json, finish_reason, merge_deltas, message_json, usage_json
from lm_serve.parsers import DeltaMessage, ToolCallDelta
from lm_serve.protocol import ChatCompletionRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.sampling import build_gen_config
from lm_serve.state import ServerState
from lm_serve.streaming import ChunkWriter, SSEResponse
from lm_serve.tool_choice import MessageStream, ToolPlan, make_message_stream, plan_tools

router = APIRouter(route_class=GuardedRoute)


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered by the pipeline (text and token ids), the request's tool plan, and its images and
    videos for the engine (`EngineRequest.multimodal` entries; None without media)."""

    rendered: RenderedPrompt
    plan: ToolPlan
    multimodal: list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        """The rendered text (output parsers look at how it ends)."""
        return self.rendered.text

    @property
    def token_ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.rendered.token_ids


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
    """Plan the tools and render the conversation through the pipeline (tools rendered unless tool_choice is none);
    bad messages, tools or template kwargs are a 400 naming the field. Images and videos (`image_url` parts, ...)
    are fetched and preprocessed here (blocking: call it off the event loop); a medium that is refused is a 400 and
    one that cannot be fetched a 422, naming the part."""
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, response_format)
    multimodal = None
    try:
        if has_media(messages):
            rendered, multimodal = state.pipeline.media_prompt(
                messages, plan.tools, chat_template_kwargs, add_generation_prompt=add_generation_prompt
            )
        else:
            rendered = state.pipeline.render(
                messages, plan.tools, chat_template_kwargs, add_generation_prompt=add_generation_prompt
            )
    except ValueError as exc:
        status = getattr(exc, "status_code", None)
        if isinstance(status, int):  # lm-vl's MediaError: its status, field and reason code
            param, code = getattr(exc, "param", None), getattr(exc, "code", None)
            raise APIError(str(exc), status_code=status, param=param, code=code) from None
        message = str(exc)
        param = next((p for p in ("chat_template_kwargs", "messages:") if message.startswith(p)), None)
        raise bad_request(exc, param=param.rstrip(":") if param else None) from None
    return ChatPrompt(rendered, plan, multimodal)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completion (OpenAI's API): streamed as SSE chunks when `stream` is true."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
    tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    user_format = body.response_format.to_engine() if body.response_format else None
    messages = [m.to_dict() for m in body.messages]
    prompt = await off_loop(
        request,
        render_chat,
        state,
        messages,
        tools,
        tool_choice,
        body.parallel_tool_calls is not False,
        user_format,
        body.chat_template_kwargs,
        force=has_media(messages),  # fetching and preprocessing media must never block the event loop
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
    job = await off_loop(
        request, prepare_job, state, prompt.rendered, gen_config, param="messages", multimodal=prompt.multimodal
    )
    streams = [make_message_stream(prompt.plan, state, prompt.text, body.chat_template_kwargs) for _ in range(body.n)]
    gen = await Generation(state, [job]).start()
    ctx = _ChatContext(state, body, streams, num_top, prompt.token_ids)
    if body.stream:
        return SSEResponse(ctx.events(gen), gen.aclose)
    try:
        results = await gen.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(ctx.completion(results))


class _ChatContext:
    """What building one request's answer needs."""

    def __init__(
        self,
        state: ServerState,
        body: ChatCompletionRequest,
        streams: list[MessageStream],
        num_top: int | None,
        prompt_ids: list[int],
    ) -> None:
        self.state = state
        self.body = body
        self.streams = streams
        self.num_top = num_top
        self.prompt_ids = prompt_ids
        self.num_prompt = len(prompt_ids)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.writer = ChunkWriter("chat.completion.chunk", "chatcmpl", state.model_name, include_usage, self.num_prompt)
        self.texts = TokenTexts(state.tokenizer)
        self.has_calls: set[int] = set()

    def _logprobs(self, piece: Piece) -> dict[str, Any] | None:
        if self.num_top is None:
            return None
        content = chat_logprobs(piece.visible_token_ids, piece.logprobs, self.num_top, self.texts)
        return {"content": content, "refusal": None}

    def completion(self, results: dict[int, Piece]) -> dict[str, Any]:
        """The non-streamed `chat.completion` object."""
        choices: list[dict[str, Any]] = []
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
        out: dict[str, Any] = {
            "id": self.writer.id,
            "object": "chat.completion",
            "created": self.writer.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": usage_json(self.num_prompt, num_completion),
            "system_fingerprint": None,
        }
        if self.body.prompt_logprobs is not None:  # vLLM's extension; every choice shares the prompt
            entries: list[dict[int, float] | None] = results[0].prompt_logprobs or [None] * self.num_prompt
            out["prompt_logprobs"] = prompt_logprobs_json(
                self.prompt_ids, entries, self.body.prompt_logprobs, self.texts
            )
        return out

    @staticmethod
    def _role_choice(index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _choices(self, piece: Piece) -> list[dict[str, Any]]:
        """The chunk choices of one piece: its text through the parsers, one tool-call piece per chunk."""
        i = piece.index
        delta = self.streams[i].feed(piece.text)
        if piece.finish_reason is not None:
            delta = merge_deltas(delta, self.streams[i].finish())
        if delta.tool_calls:
            self.has_calls.add(i)
        logprobs = self._logprobs(piece)
        reason = finish_reason(piece.finish_reason, i in self.has_calls)
        if delta_is_empty(delta) and reason is None and not (logprobs and logprobs["content"]):
            return []
        parts = _openai_chunk_deltas(delta)
        return [
            {
                "index": i,
                "delta": delta_json(part),
                "logprobs": logprobs if k == 0 else None,
                "finish_reason": reason if k == len(parts) - 1 else None,
            }
            for k, part in enumerate(parts)
        ]

    def events(self, gen: Generation) -> AsyncIterator[str]:
        """The SSE stream of `chat.completion.chunk`s."""
        return self.writer.events(gen, self._choices, self._role_choice)


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
