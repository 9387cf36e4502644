"""`POST /v1/embeddings`: the model's final hidden states pooled per input (mean, or the last token's)."""

from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Request

from lm_serve.errors import APIError, bad_request
from lm_serve.protocol import EmbeddingRequest
from lm_serve.request_guards import GuardedRoute
from lm_serve.state import ServerState

router = APIRouter(route_class=GuardedRoute)


def _inputs(value) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError("input is empty", param="input")
    if all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict:
    """One embedding per input string (or token-id list), as floats or base64 little-endian float32."""
    state: ServerState = request.app.state.lm
    state.check_model(body.model)
    inputs = _inputs(body.input)
    state.limiter.acquire()
    try:
        data, num_tokens = [], 0
        for index, item in enumerate(inputs):
            try:
                vector, count = await state.pipeline.embed(item, body.pooling, body.normalize)
            except ValueError as exc:
                raise bad_request(exc, param="input") from None
            except NotImplementedError as exc:
                raise APIError(str(exc), status_code=400, param="model", code="embeddings_not_supported") from None
            if body.dimensions is not None and body.dimensions != len(vector):
                raise APIError(
                    f"dimensions: this model's embeddings have {len(vector)} dimensions and cannot be shortened",
                    param="dimensions",
                )
            num_tokens += count
            if body.encoding_format == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            else:
                embedding = vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
    finally:
        state.limiter.release()
    return {
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }
