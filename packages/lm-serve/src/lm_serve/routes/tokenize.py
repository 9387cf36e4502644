"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (vLLM's shapes): what the model sees, without
generating. lm-eval-harness's `local-completions` tokenizes through them when `/tokenizer_info` answers (its default
`tokenizer_backend`), so it needs no tokenizer of its own."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from lm_serve.errors import APIError, bad_request
from lm_serve.offload import off_loop
from lm_serve.protocol import DetokenizeRequest, TokenizeRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.routes.chat import render_chat
from lm_serve.state import ServerState

# The named special tokens `/tokenizer_info` reports (text and id); each key is present, null when undefined.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")

router = APIRouter(route_class=GuardedRoute)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids of `prompt`, or of `messages` rendered with the chat template."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of prompt and messages", param="prompt")
    tokenizer = state.tokenizer
    if body.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        rendered = await off_loop(
            request,
            render_chat,
            state,
            [m.to_dict() for m in body.messages],
            tools,
            None,
            True,
            None,
            body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
        )
        ids = rendered.token_ids
    else:
        try:
            ids = await off_loop(request, tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as exc:
            raise bad_request(exc, param="prompt") from None
    out: dict[str, Any] = {"count": len(ids), "max_model_len": state.session_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """The text of `tokens`."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    vocab = state.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(f"tokens must be token ids in [0, {vocab})", param="tokens")
    return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """The tokenizer's configuration, as a tokenizer_config.json would give it: its class, special tokens, length
    limit and the chat template this server renders with."""
    state: ServerState = request.app.state.lm
    tokenizer = state.tokenizer
    special = tokenizer.special_tokens
    hf = tokenizer.hf
    tokenizer_class = getattr(hf, "init_kwargs", {}).get("tokenizer_class") or type(hf).__name__
    info: dict[str, Any] = {"tokenizer_class": tokenizer_class}
    for name in _SPECIAL_TOKENS:
        text = special.get(name)
        info[name] = text
        info[f"{name}_id"] = tokenizer.convert_tokens_to_ids(text) if text is not None else None
    info["eos_token_ids"] = list(tokenizer.eos_token_ids)
    info["model_max_length"] = state.session_len
    info["vocab_size"] = tokenizer.vocab_size
    info["chat_template"] = getattr(state.pipeline.chat_template, "source", None)
    return info
