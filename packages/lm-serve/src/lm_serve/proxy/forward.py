"""Forwarding one request: pick a node, send the request, relay the node's answer.

An event stream (SSE) is relayed chunk by chunk as the node sends it; any other answer (a JSON body) is complete
before it is useful, so it is read whole and then sent with its length. The node's status code, headers and error
bodies pass unchanged. Until the first byte goes to the client, a node that cannot be reached, drops the connection,
sends nothing for `read_timeout`, or is found stalled by a health check is marked unhealthy and the request goes to
another node. Once the client has a byte, the request is committed to its node: if the node fails then, the stream
ends with an OpenAI error event and `data: [DONE]`. When the client disconnects, the upstream connection is closed,
which is how the node learns to abort the generation.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from lm_serve.proxy.nodes import Node, NodeTable, describe_error

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

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


class NodeFailed(Exception):
    """The node failed to answer: `reason` says how; `stalled` when it stopped answering rather than refused."""

    def __init__(self, reason: str, stalled: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stalled = stalled


class NodeReader:
    """Awaits what one node sends for one request, giving up when the node is marked stalled.

    Before the answer is committed (nothing has reached the client), a stall ends the wait at once so the request
    can fail over. After, it ends the wait once this answer too has been silent for `silence_limit` seconds: a stream
    still sending bytes is alive whatever the health check says, and is watched until the node recovers.
    """

    def __init__(self, node: Node, silence_limit: float) -> None:
        self.node = node
        self.stalled = node.stalled  # the event current now: a recovery replaces the node's (see _follow_recovery)
        self.silence_limit = silence_limit
        self.is_committed = False
        self.last_byte_at = time.monotonic()

    async def wait(self, awaitable: Awaitable):
        """The result of `awaitable`; NodeFailed when it fails with a transport error or the node stalls."""
        import httpx

        work = asyncio.ensure_future(awaitable)
        try:
            while not work.done():
                self._follow_recovery()
                if not self.stalled.is_set():
                    watch = asyncio.ensure_future(self.stalled.wait())
                    try:
                        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        watch.cancel()
                    continue
                silent_for = time.monotonic() - self.last_byte_at
                if not self.is_committed or silent_for >= self.silence_limit:
                    raise NodeFailed(self.node.last_error or "the node stopped answering", stalled=True)
                await asyncio.wait({work}, timeout=self.silence_limit - silent_for)
            return work.result()
        except httpx.TransportError as exc:
            raise NodeFailed(describe_error(exc), stalled=isinstance(exc, httpx.TimeoutException)) from exc
        finally:
            if not work.done():
                work.cancel()
                # Let the cancelled request close its connection; asyncio.wait neither raises the task's error nor
                # swallows a cancellation of this task.
                await asyncio.wait({work})

    async def next_chunk(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The node's next chunk of body, or None at its end."""
        chunk = await self.wait(anext(chunks, None))
        self.last_byte_at = time.monotonic()
        return chunk

    def _follow_recovery(self) -> None:
        # A node found healthy again has a fresh, unset event: watch that one from now on.
        if self.stalled.is_set() and self.node.healthy and self.node.stalled is not self.stalled:
            self.stalled = self.node.stalled


class ForwardResponse(Response):
    """A response that, when sent, forwards its request to a node of `table` and relays the node's answer.

    `silence_limit`: how long a committed stream on a node found stalled may have been silent before it is ended.
    """

    def __init__(
        self,
        table: NodeTable,
        client: httpx.AsyncClient,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        silence_limit: float,
    ) -> None:
        self.table = table
        self.client = client
        self.method = method
        self.target = target  # path and query, e.g. "/v1/completions?x=1"
        self.headers_out = [(key, value) for key, value in headers if key.lower() not in HOP_BY_HOP]
        self.body_out = body
        self.silence_limit = silence_limit
        content_type = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"), None)
        self.model = requested_model(body, content_type)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forwards the request upstream until it is answered or the client disconnects, whichever is first."""
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
        error = None if forward.cancelled() else forward.exception()
        if error is not None:
            raise error

    async def _forward(self, send: Send) -> None:
        tried: set[str] = set()
        failures: list[str] = []
        while True:
            node = self.table.acquire(self.model, exclude=tried)
            if node is None:
                await self._no_node(send, failures)
                return
            tried.add(node.url)
            started = time.monotonic()
            latency = None
            try:
                if await self._answer_from(node, send):
                    latency = time.monotonic() - started
                return
            except NodeFailed as exc:
                # Nothing has reached the client yet: this node is out, try the next one.
                self.table.mark_failed(node, exc.reason, exc.stalled)
                failures.append(f"{node.url}: {exc.reason}")
            finally:
                self.table.release(node, latency)

    async def _answer_from(self, node: Node, send: Send) -> bool:
        """Relay `node`'s answer; True if it came whole. NodeFailed (only) while nothing has reached the client."""
        reader = NodeReader(node, self.silence_limit)
        request = self.client.build_request(
            self.method, node.url + self.target, headers=self.headers_out, content=self.body_out
        )
        upstream = await reader.wait(self.client.send(request, stream=True))
        try:
            headers = [(k, v) for k, v in upstream.headers.raw if k.lower() not in DROPPED_RESPONSE_HEADERS]
            # aiter_raw: the bytes as they arrive, still in the node's content-encoding (which the headers name).
            chunks = upstream.aiter_raw()
            if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                parts = []
                while (chunk := await reader.next_chunk(chunks)) is not None:
                    parts.append(chunk)
                body = b"".join(parts)
                headers.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return True
            # The stream commits with its first chunk: a node that stalls before sending one is still failed over.
            chunk = await reader.next_chunk(chunks)
            await send({"type": "http.response.start", "status": upstream.status_code, "headers": headers})
            reader.is_committed = True
            return await self._relay_stream(node, reader, chunks, chunk, send)
        finally:
            await upstream.aclose()

    async def _relay_stream(
        self, node: Node, reader: NodeReader, chunks: AsyncIterator[bytes], chunk: bytes | None, send: Send
    ) -> bool:
        """Relay the rest of a committed stream; True if it came whole, False if the node failed mid-way."""
        tail = b"\n\n"
        is_whole = True
        try:
            while chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                tail = (tail + chunk)[-2:]
                chunk = await reader.next_chunk(chunks)
        except NodeFailed as exc:
            # Too late to fail over; the status line is gone, so the error can only go into the stream.
            self.table.mark_failed(node, exc.reason, exc.stalled)
            error = {
                "message": f"the node serving this stream failed: {exc.reason}",
                "type": "server_error",
                "param": None,
                "code": 502,
            }
            # A chunk cut mid-event is closed first, so that the error is an event of its own.
            event = b"" if tail == b"\n\n" else b"\n\n"
            event += f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": True})
            is_whole = False
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return is_whole

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
