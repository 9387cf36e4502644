"""An httpx transport that dials one pre-validated IP address and holds every socket operation to a deadline.

httpx resolves host names itself when it connects, so checking a host's addresses and then handing the URL to a
stock client leaves a window in which a rebinding DNS server answers differently (the check sees a public address,
the connection goes to 127.0.0.1). `PinnedTransport` closes it one layer down, in httpcore's network backend: the
URL and so the Host header, TLS SNI and certificate check keep the host name, while the socket is opened to the
address `resolve_host` validated, with no second lookup.
"""

from __future__ import annotations

import contextlib
import ssl
import time
import typing
from collections.abc import Iterator

import httpcore
import httpx

from lm_vl.media.addresses import IPAddress

# httpcore's exceptions share no base class; these are all it raises from a request or a body read.
_TIMEOUT_ERRORS = (httpcore.TimeoutException,)
_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    httpcore.ConnectionNotAvailable,
)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose reads, writes and TLS handshake never wait past `deadline` (time.monotonic())."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def _bounded(self, timeout: float | None) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise httpcore.ReadTimeout("the total time allowed for the fetch ran out")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._bounded(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._bounded(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        stream = self._inner.start_tls(ssl_context, server_hostname, self._bounded(timeout))
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections to `address` only, whatever host name httpcore asks for (the transport checked it)."""

    def __init__(self, address: IPAddress, deadline: float) -> None:
        self._address = address
        self._deadline = deadline
        self._tcp = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise httpcore.ConnectTimeout("the total time allowed for the fetch ran out")
        timeout = remaining if timeout is None else min(timeout, remaining)
        # An IP literal: socket.create_connection's getaddrinfo only parses it, it never asks a resolver.
        stream = self._tcp.connect_tcp(str(self._address), port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: typing.Iterable[typing.Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for media")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: typing.Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class PinnedTransport(httpx.BaseTransport):
    """Sends requests for `host` (a URL's raw host) to `address`, and refuses requests for any other host.

    Every socket operation, including connecting and the TLS handshake, is bounded by `deadline` as well as by the
    request's own timeouts. `ssl_context` defaults to httpx's (certifi's CA bundle, verification on); the
    certificate is checked against `host`, never against the address.
    """

    def __init__(
        self, host: bytes, address: IPAddress, deadline: float, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._host = host
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context if ssl_context is not None else httpx.create_ssl_context(),
            max_connections=1,
            network_backend=_PinnedBackend(address, deadline),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` over a connection to the pinned address."""
        if request.url.raw_host != self._host:
            raise httpx.ConnectError(f"this transport only reaches {self._host.decode()!r}", request=request)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=typing.cast(typing.Iterable[bytes], request.stream),
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(typing.cast(typing.Iterable[bytes], response.stream)),
            extensions=response.extensions,
        )

    def close(self) -> None:
        """Close the pooled connection."""
        self._pool.close()


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except _TIMEOUT_ERRORS as exc:
        raise httpx.TimeoutException(str(exc) or type(exc).__name__) from exc
    except _TRANSPORT_ERRORS as exc:
        raise httpx.TransportError(str(exc) or type(exc).__name__) from exc
