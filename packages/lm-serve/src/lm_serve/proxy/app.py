"""The proxy's FastAPI app: its own routes (`/health`, `/nodes`, merged `/v1/models`) and a catch-all that forwards
every other request (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`, `/tokenize`, ...)
to a healthy node.

Keys (`ProxyAuth`): with `api_keys`, every route but `/health` and node management needs a client key, checked here
and forwarded with the request. Node management (`/nodes...`, `/openapi.json`) needs the admin key instead; a proxy
without one refuses it with 403, so nobody can add a node that would receive the clients' keys and prompts.

Registration contract (what `lm serve api_server --proxy-url` uses, through `lm_serve.proxy.register_with_proxy`),
each call with `Authorization: Bearer ADMIN_KEY`:

- `POST /nodes/add` with `{"url": "http://host:port"}`: adds the node (adding a known URL again is fine), health-checks
  it at once and answers 200 with the node as `GET /nodes` lists it (`healthy` false if the check failed: the periodic
  checks bring it in later). A bad URL answers 400.
- `POST /nodes/remove` with `{"url": ...}`: answers 200 with the removed node, 404 if the URL is unknown. Requests
  already streaming from it finish.
- `GET /nodes`: `{"routing_strategy": ..., "nodes": [{"url", "healthy", "in_flight", "num_requests",
  "num_failures", "models", "last_error", "mean_latency"}, ...]}`.
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lm_serve.auth import APIKeyMiddleware
from lm_serve.proxy.forward import ForwardResponse, openai_error
from lm_serve.proxy.nodes import NodeTable, ProxyConfig, normalize_node_url

logger = logging.getLogger("lm_serve.proxy")

FORWARDED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
# Paths that manage or describe the node table: the admin key's, never forwarded to a node.
ADMIN_PREFIX = "/nodes"
ADMIN_PATHS = frozenset({"/openapi.json"})
# Interactive API pages are not served (they would need the admin key, which a browser page cannot send).
UNSERVED_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
NO_ADMIN_KEY = (
    "node management over HTTP is disabled on this proxy: start it with --admin-key KEY (or the environment "
    "variable LM_PROXY_ADMIN_KEY) and send 'Authorization: Bearer KEY'; api_servers registering with --proxy-url "
    "pass it with --proxy-admin-key. Nodes given with --nodes need no key."
)


def is_admin_path(path: str) -> bool:
    """Whether `path` is node management (the admin key's)."""
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/") or path in ADMIN_PATHS


class ProxyAuth:
    """ASGI middleware: the admin key for node management, the client keys (if any) for everything else.

    Both checks are `lm_serve.auth.APIKeyMiddleware` (so `/health` stays open); without an admin key, node
    management answers 403 explaining how to enable it.
    """

    def __init__(self, app, api_keys: list[str], admin_key: str | None) -> None:
        self.app = app
        self.clients = APIKeyMiddleware(app, api_keys)
        self.admin = APIKeyMiddleware(app, [admin_key]) if admin_key else None

    async def __call__(self, scope, receive, send) -> None:
        """Checks the admin key on node-management paths and the client keys elsewhere."""
        if scope["type"] != "http" or not is_admin_path(scope["path"]):
            await self.clients(scope, receive, send)
        elif self.admin is not None:
            await self.admin(scope, receive, send)
        else:
            await openai_error(403, NO_ADMIN_KEY, "permission_error")(scope, receive, send)


def create_app(config: ProxyConfig) -> FastAPI:
    """The proxy app for `config`; its node table is `app.state.table`, its client to the nodes `app.state.client`."""
    table = NodeTable(config.routing_strategy)
    for url in config.nodes:
        table.add(url)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # The read (and write) timeout bounds each wait for a byte, not a whole answer: a stream may run for minutes.
        # trust_env=False: nodes are reached directly, never through an HTTP(S)_PROXY meant for the outside world.
        timeout = httpx.Timeout(config.read_timeout, connect=config.connect_timeout, pool=None)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            app.state.client = client
            await table.check_all(client, config.health_timeout, node_headers)
            health_loop = asyncio.create_task(_check_periodically(table, client, config, node_headers))
            try:
                yield
            finally:
                health_loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await health_loop

    # The proxy's own client key (if it has any) lets nodes that share the keys tell it their models.
    node_headers = {"Authorization": f"Bearer {config.api_keys[0]}"} if config.api_keys else None
    app = FastAPI(title="lm-serve proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.table = table
    app.state.config = config
    app.add_middleware(ProxyAuth, api_keys=config.api_keys, admin_key=config.admin_key)

    @app.get("/health")
    async def health() -> dict:
        """The proxy itself is up; how many of its nodes are healthy."""
        nodes = table.nodes
        return {"status": "ok", "num_nodes": len(nodes), "num_healthy_nodes": sum(node.healthy for node in nodes)}

    @app.get("/nodes")
    async def list_nodes() -> dict:
        return {"routing_strategy": table.routing_strategy, "nodes": [node.to_dict() for node in table.nodes]}

    @app.post("/nodes/add")
    async def add_node(request: Request) -> Response:
        url = await _url_from_body(request)
        if isinstance(url, Response):
            return url
        node = table.add(url)
        await table.check(node, request.app.state.client, config.health_timeout, node_headers)
        logger.info("node %s registered (%s)", node.url, "healthy" if node.healthy else "not healthy yet")
        return JSONResponse(node.to_dict())

    @app.post("/nodes/remove")
    async def remove_node(request: Request) -> Response:
        url = await _url_from_body(request)
        if isinstance(url, Response):
            return url
        node = table.remove(url)
        if node is None:
            return openai_error(404, f"url: no node {url} is registered", "not_found_error")
        logger.info("node %s removed", node.url)
        return JSONResponse(node.to_dict())

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        """The union of the healthy nodes' models, asked with the client's own Authorization header."""
        nodes = [node for node in table.nodes if node.healthy]
        if not nodes:
            return openai_error(503, f"no healthy node (0 of {len(table.nodes)} nodes healthy)", "service_unavailable")
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        client = request.app.state.client
        # Bounded like a health check: a stalled node must not hold up the list (it is left out of it).
        timeout = config.health_timeout
        answers = await asyncio.gather(
            *(
                asyncio.wait_for(client.get(f"{node.url}/v1/models", headers=headers, timeout=timeout), timeout)
                for node in nodes
            ),
            return_exceptions=True,
        )
        models: dict[str, dict] = {}
        refusal = None
        num_answered = 0
        for answer in answers:
            if isinstance(answer, BaseException):
                continue
            if answer.status_code != 200:
                refusal = refusal or answer
                continue
            try:
                entries = answer.json()["data"]
            except (ValueError, KeyError, TypeError):
                continue
            num_answered += 1
            for entry in entries:
                if isinstance(entry, dict) and "id" in entry:
                    models.setdefault(entry["id"], entry)
        if not num_answered and refusal is not None:
            # Every node refused (a bad API key, typically): the client gets the node's own answer.
            media_type = refusal.headers.get("content-type", "application/json")
            return Response(refusal.content, status_code=refusal.status_code, media_type=media_type)
        if not num_answered:
            return openai_error(503, "no node answered GET /v1/models", "service_unavailable")
        return JSONResponse({"object": "list", "data": list(models.values())})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        # Forwarding would show one random node's counters as if they were the whole fleet's.
        return openai_error(404, "the proxy has no /metrics: scrape each node (GET /nodes lists them)", "not_found")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict:
        """The proxy's own routes (the forwarded API is each node's)."""
        return app.openapi()

    @app.api_route("/{path:path}", methods=FORWARDED_METHODS, include_in_schema=False)
    async def forward(request: Request, path: str) -> Response:
        path = request.url.path
        if is_admin_path(path) or path in UNSERVED_PATHS:
            # Never forwarded: a node must not see the admin key, nor answer for the proxy's own pages.
            return openai_error(404, f"the proxy has no {request.method} {path} (see docs/proxy.md)", "not_found")
        body = await request.body()
        target = path + (f"?{request.url.query}" if request.url.query else "")
        client = request.app.state.client
        return ForwardResponse(table, client, request.method, target, request.headers.raw, body, config.health_timeout)

    return app


async def _url_from_body(request: Request) -> str | Response:
    """The `url` field of a `/nodes/*` request body, normalised; or the 400 response explaining what is wrong."""
    try:
        payload = await request.json()
    except ValueError:
        return openai_error(400, 'expected a JSON body {"url": "http://host:port"}', "invalid_request_error")
    if not isinstance(payload, dict) or "url" not in payload:
        return openai_error(400, 'url: missing; expected {"url": "http://host:port"}', "invalid_request_error")
    try:
        return normalize_node_url(payload["url"])
    except ValueError as exc:
        return openai_error(400, str(exc), "invalid_request_error")


async def _check_periodically(
    table: NodeTable, client: httpx.AsyncClient, config: ProxyConfig, headers: dict[str, str] | None
) -> None:
    while True:
        await asyncio.sleep(config.health_interval)
        try:
            await table.check_all(client, config.health_timeout, headers)
        except Exception:  # a bug in one round must not end the health checks for good
            logger.exception("health check round failed")
