"""`POST /tokenize` and `POST /detokenize` (vLLM's shapes): what the model sees, without generating."""

from __future__ import annotations

from fastapi import APIRouter, Request

from lm_serve.errors import APIError, bad_request
from lm_serve.offload import off_loop
from lm_serve.protocol import DetokenizeRequest, TokenizeRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.routes.chat import render_chat
from lm_serve.state import ServerState

router = APIRouter(route_class=GuardedRoute)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
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
    out = {"count": len(ids), "max_model_len": state.session_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    """The text of `tokens`."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    vocab = state.tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(f"tokens must be token ids in [0, {vocab})", param="tokens")
    return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)}
