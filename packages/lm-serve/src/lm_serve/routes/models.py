"""`GET /v1/models`, `GET /v1/models/{model}`, `GET /health` and `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lm_serve.errors import APIError
from lm_serve.state import ServerState

router = APIRouter()


def _model_card(state: ServerState, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "lm-deploy",
        # The served name, never the local path of the weights (it tells callers about the host's file system).
        "root": state.model_name,
        "parent": None,
        "max_model_len": state.session_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """The served model (under each of its names)."""
    state: ServerState = request.app.state.lm
    return {"object": "list", "data": [_model_card(state, name) for name in state.model_names]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict:
    """One served model; 404 for any other name."""
    state: ServerState = request.app.state.lm
    if model not in state.model_names:
        raise APIError(f"The model {model!r} does not exist", status_code=404, param="model", code="model_not_found")
    return _model_card(state, model)


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> Response:
    """200 while the server can generate, 503 with the reason once its engine cannot (a dead worker group); no API
    key needed, HEAD too, for load balancers' checks."""
    state: ServerState = request.app.state.lm
    failure = state.pipeline.engine.failure
    if failure is not None:
        return APIError(failure, status_code=503, type="server_error", code="engine_unavailable").response()
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST

    state: ServerState = request.app.state.lm
    if state.metrics is None:  # an app built without metrics
        return Response(status_code=404)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
