"""`POST /v1/responses`: OpenAI's Responses API over the chat path (text, function tools, streaming events).

Nothing is stored: `previous_response_id` is refused, and a conversation is continued by sending its items again.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from lm_core.multimodal import has_media
from lm_serve.errors import APIError
from lm_serve.generation import ClientDisconnected, Generation, prepare_job
from lm_serve.offload import off_loop
from lm_serve.output import new_id, now
from lm_serve.protocol import ResponsesRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.responses_stream import ResponseEventWriter, output_items, response_json
from lm_serve.routes.chat import render_chat
from lm_serve.sampling import build_gen_config
from lm_serve.state import ServerState
from lm_serve.streaming import SSEResponse
from lm_serve.tool_choice import make_message_stream

router = APIRouter(route_class=GuardedRoute)
_TEXT_PART_TYPES = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


def _field(item: dict[str, Any], key: str, where: str, kind: type = str) -> Any:
    value = item.get(key)
    if not isinstance(value, kind):
        raise APIError(f"{where}.{key} must be a {kind.__name__}", param=f"{where}.{key}")
    return value


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A Responses item's content as chat content: a string, or chat content parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PART_TYPES:
            parts.append({"type": "text", "text": _field(part, "text", at)})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _field(part, "refusal", at)})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": _field(part, "image_url", at)}})
        else:
            raise APIError(f"{at}.type {kind!r} is not supported (text and image parts are)", param=f"{at}.type")
    return parts


def input_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input (a string or items) as chat messages; `instructions` become the system message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = _field(item, "role", where)
            messages.append({"role": role, "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {
                "id": _field(item, "call_id", where),
                "type": "function",
                "function": {"name": _field(item, "name", where), "arguments": _field(item, "arguments", where)},
            }
            last = messages[-1] if messages else None
            # The calls of one turn belong to one assistant message (with its text, if the turn had any).
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                parts = _content(output, where)
                output = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
            if not isinstance(output, str):
                raise APIError(f"{where}.output must be a string", param=f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where), "content": output})
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (chat templates drop it too)
        else:
            raise APIError(f"{where}.type {kind!r} is not supported", param=f"{where}.type")
    return messages


def _text_format(body: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format` (None: plain text)."""
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.json_schema}}
    if fmt.type == "regex":
        return {"type": "regex", "regex": fmt.regex}
    return {"type": "json_object"}


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """A model response (OpenAI's Responses API); a stream of typed events when `stream` is true."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    if body.previous_response_id is not None:
        raise APIError(
            "previous_response_id is not supported: this server stores no responses; send the whole conversation "
            "as input items",
            param="previous_response_id",
        )
    tools = (
        [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type", "strict"})}
            for t in body.tools
        ]
        if body.tools
        else None
    )
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    messages = input_messages(body.instructions, body.input)
    prompt = await off_loop(
        request,
        render_chat,
        state,
        messages,
        tools,
        choice,
        body.parallel_tool_calls is not False,
        _text_format(body),
        body.chat_template_kwargs,
        force=has_media(messages),  # fetching and preprocessing media must never block the event loop
    )
    gen_config = build_gen_config(
        body,
        max_tokens=body.max_output_tokens,
        logprobs=None,
        response_format=prompt.plan.response_format,
        model_defaults=state.pipeline.generation_defaults,
        vocab_size=state.tokenizer.vocab_size,
        n=1,
    )
    job = await off_loop(
        request, prepare_job, state, prompt.rendered, gen_config, param="messages", multimodal=prompt.multimodal
    )
    parser = make_message_stream(prompt.plan, state, prompt.text, body.chat_template_kwargs)
    gen = await Generation(state, [job]).start()
    base = {
        "id": new_id("resp", "_"),
        "created_at": now(),
        "model": state.model_name,
        "request": body,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else [],
    }
    if body.stream:
        writer = ResponseEventWriter(base, parser, len(prompt.token_ids))
        return SSEResponse(writer.events(gen), gen.aclose)
    try:
        results = await gen.collect(request)
    except ClientDisconnected:
        return Response(status_code=499)
    result = results[0]
    if result.finish_reason == "error":
        raise APIError(result.error or "generation failed", status_code=500, type="server_error")
    items = output_items(parser.parse(result.text))
    return JSONResponse(
        response_json(base, items, result.finish_reason, len(prompt.token_ids), result.generate_token_len)
    )
