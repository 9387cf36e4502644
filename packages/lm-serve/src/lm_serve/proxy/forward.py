"""Forwarding one request: pick a node, send the request, stream the node's answer back byte for byte.

The answer is relayed as the node sends it (no buffering), with the node's status code, headers and error bodies.
A node that cannot be reached before its answer starts is marked unhealthy and the request goes to another node;
once the first byte has gone to the client the request is committed to its node. When the client disconnects, the
upstream connection is closed, which is how the node learns to abort the generation.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from lm_serve.proxy.nodes import NodeTable, describe_error

if TYPE_CHECKING:
    import httpx
    from starlette.types import Receive, Scope, Send

# Headers that describe one connection, not the message: never relayed in either direction (RFC 9110 7.6.1).
# `host` and `content-length` are set again by httpx for the node; `server` and `date` by uvicorn for the client.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {b"server", b"date"}


def openai_error(status_code: int, message: str, error_type: str) -> JSONResponse:
    """An error response in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": status_code}}
    return JSONResponse(body, status_code=status_code)


def requested_model(body: bytes, content_type: str | None) -> str | None:
    """The `model` field of a JSON request body, or None (not JSON, no such field): the node validates the rest."""
    if not body or "json" not in (content_type or ""):
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


class ForwardResponse(Response):
    """A response that, when sent, forwards its request to a node of `table` and relays the node's answer."""

    def __init__(
        self,
        table: NodeTable,
        client: httpx.AsyncClient,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self.table = table
        self.client = client
        self.method = method
        self.target = target  # path and query, e.g. "/v1/completions?x=1"
        self.headers_out = [(key, value) for key, value in headers if key.lower() not in HOP_BY_HOP]
        self.body_out = body
        content_type = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"), None)
        self.model = requested_model(body, content_type)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Forward while watching for the client to leave: whichever ends first cancels the other, and cancelling the
        # forward closes the upstream connection (also while still waiting for a non-streamed answer's headers).
        forward = asyncio.ensure_future(self._forward(send))
        watch = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({forward, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, watch):
                task.cancel()
            await asyncio.gather(forward, watch, return_exceptions=True)
        if not forward.cancelled() and forward.exception() is not None:
            raise forward.exception()

    async def _forward(self, send: Send) -> None:
        import httpx

        tried: set[str] = set()
        failures: list[str] = []
        while True:
            node = self.table.acquire(self.model, exclude=tried)
            if node is None:
                await self._no_node(send, failures)
                return
            tried.add(node.url)
            request = self.client.build_request(
                self.method, node.url + self.target, headers=self.headers_out, content=self.body_out
            )
            try:
                upstream = await self.client.send(request, stream=True)
                break
            except httpx.TransportError as exc:
                # Nothing has reached the client yet: this node is out, try the next one.
                self.table.release(node)
                reason = describe_error(exc)
                self.table.mark_failed(node, reason)
                failures.append(f"{node.url}: {reason}")
            except BaseException:
                self.table.release(node)
                raise
        try:
            await self._relay(upstream, send, node)
        finally:
            await upstream.aclose()
            self.table.release(node)

    async def _relay(self, upstream: httpx.Response, send: Send, node) -> None:
        import httpx

        headers = [(k, v) for k, v in upstream.headers.raw if k.lower() not in DROPPED_RESPONSE_HEADERS]
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
        try:
            # aiter_raw: the bytes as they arrive, still in the node's content-encoding (which the headers name).
            async for chunk in upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError as exc:
            # The node died mid-answer; the status line is gone, so the error can only go into the body.
            reason = describe_error(exc)
            self.table.mark_failed(node, reason)
            if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                raise  # uvicorn drops the connection: a client must not take a truncated body for a whole one
            error = {"message": f"the node serving this stream failed: {reason}", "type": "server_error", "code": 502}
            event = f"data: {json.dumps({'error': error})}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _no_node(self, send: Send, failures: list[str]) -> None:
        num_nodes = len(self.table.nodes)
        num_healthy = sum(node.healthy for node in self.table.nodes)
        message = f"no healthy node to serve the request ({num_healthy} of {num_nodes} nodes healthy)"
        if failures:
            message += "; tried " + "; ".join(failures)
        response = openai_error(503, message, "service_unavailable")
        await response(scope={"type": "http"}, receive=_never, send=send)


async def _wait_for_disconnect(receive: Receive) -> None:
    # The request body has been read already, so the next message can only be the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _never() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}
