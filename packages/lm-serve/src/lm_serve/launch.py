"""Running the app with uvicorn, and the `lm-serve: ready at http://HOST:PORT` line once it listens."""

from __future__ import annotations

import asyncio
import sys

import uvicorn

READY_PREFIX = "lm-serve: ready at "


class _Server(uvicorn.Server):
    """uvicorn's server, announcing the bound address (port 0 picks a free one) after start-up, and joining the
    proxy at `proxy_url` (if any) once it listens, leaving it first thing at shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        display_host: str,
        proxy_url: str | None = None,
        proxy_admin_key: str | None = None,
    ) -> None:
        super().__init__(config)
        self.display_host = display_host
        self.proxy_url = proxy_url
        self.proxy_admin_key = proxy_admin_key
        self.membership = None

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
        await super().shutdown(sockets)


def run_server(
    app,
    host: str,
    port: int,
    log_level: str = "info",
    proxy_url: str | None = None,
    proxy_admin_key: str | None = None,
) -> None:
    """Serve `app` until interrupted (Ctrl-C or SIGTERM: a graceful shutdown that closes the engine).

    With `proxy_url`, the server registers with that proxy (sending `proxy_admin_key`, the proxy's admin key) once it
    listens and unregisters at shutdown; a proxy that cannot be reached or refuses costs a warning, not the server.
    """
    # On SIGTERM, open streams get a few seconds to finish; then they are cut (and their engine requests aborted).
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=5
    )
    # Announce an address a client can reach: the wildcard itself is not one.
    display = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)
    server = _Server(config, display, proxy_url, proxy_admin_key)
    server.run()
    if server.started is False:
        sys.exit(1)
