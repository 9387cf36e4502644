"""Running the app with uvicorn, and the `lm-serve: ready at http://HOST:PORT` line once it listens."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import uvicorn

READY_PREFIX = "lm-serve: ready at "
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 20.0
# After the shutdown timeout, requests still running get this long to write their 503 or error event.
_DRAIN_GRACE = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, announcing the bound address (port 0 picks a free one) after start-up, and joining the
    proxy at `proxy_url` (if any) once it listens, leaving it first thing at shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        display_host: str,
        proxy_url: str | None = None,
        proxy_admin_key: str | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        on_shutdown_timeout: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(config)
        self.display_host = display_host
        self.proxy_url = proxy_url
        self.proxy_admin_key = proxy_admin_key
        self.membership = None
        self.shutdown_timeout = shutdown_timeout
        self.on_shutdown_timeout = on_shutdown_timeout

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn raises a caught signal again once shut down (the exit status would say "killed by SIGTERM"); a
        # SIGTERM is the normal way to stop a server, and a completed graceful shutdown exits with status 0.
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        # Bound port per address family: with port 0 (and host "", which listens on IPv4 and IPv6) they may differ.
        ports: dict[int, int] = {}
        for server in self.servers:
            for sock in server.sockets:
                ports.setdefault(sock.family, sock.getsockname()[1])
        port = next(iter(ports.values()), self.config.port)
        print(f"{READY_PREFIX}http://{self.display_host}:{port}", flush=True)
        if self.proxy_url:
            from lm_serve.proxy.membership import ProxyMembership, advertised_url

            # Only now: the proxy health-checks this server as it registers, so it must already accept connections.
            # In a thread: finding the address may resolve the proxy's host name, which must not stall the event loop.
            own_url = await asyncio.to_thread(advertised_url, self.config.host, ports, self.proxy_url)
            self.membership = ProxyMembership(self.proxy_url, own_url, admin_key=self.proxy_admin_key)
            self.membership.start()

    async def shutdown(self, sockets=None) -> None:
        # Leave the proxy before closing the listener, so that it stops routing new requests here first.
        if self.membership is not None and not self.force_exit:
            await self.membership.leave()
        # uvicorn stops accepting, lets running requests go on, and cancels them after timeout_graceful_shutdown;
        # before that, at shutdown_timeout, the app is told to end them with a proper error (503, error event).
        timer = asyncio.ensure_future(self._end_requests_after(self.shutdown_timeout))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    async def _end_requests_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.on_shutdown_timeout is not None:
            await self.on_shutdown_timeout()


def run_server(
    app,
    host: str,
    port: int,
    log_level: str = "info",
    proxy_url: str | None = None,
    proxy_admin_key: str | None = None,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    on_shutdown_timeout: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve `app` until interrupted (Ctrl-C or SIGTERM: a graceful shutdown that closes the engine, exit status 0).

    At shutdown the server stops accepting and waits up to `shutdown_timeout` seconds for running requests, then
    calls `on_shutdown_timeout` (the app ends what still runs). A connection that has not sent a whole request head
    within `header_timeout` seconds is closed. With `proxy_url`, the server registers with that proxy (sending
    `proxy_admin_key`, the proxy's admin key) once it listens and unregisters at shutdown; a proxy that cannot be
    reached or refuses costs a warning, not the server.
    """
    from lm_serve.http_protocol import with_header_timeout

    if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, int | float) or shutdown_timeout < 0:
        raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}")
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=30,
        # uvicorn annotates this int but passes it to asyncio.timeout, which takes fractions of a second.
        timeout_graceful_shutdown=shutdown_timeout + _DRAIN_GRACE,  # pyright: ignore[reportArgumentType]
        http=with_header_timeout(header_timeout),
    )
    # Announce an address a client can reach: the wildcard itself is not one.
    display = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    server = _Server(config, display, proxy_url, proxy_admin_key, shutdown_timeout, on_shutdown_timeout)
    server.run()
    if server.started is False:
        sys.exit(1)
