"""Running the app with uvicorn, and the `lm-serve: ready at http://HOST:PORT` line once it listens."""

from __future__ import annotations

import sys

import uvicorn

READY_PREFIX = "lm-serve: ready at "


class _Server(uvicorn.Server):
    """uvicorn's server, announcing the bound address (port 0 picks a free one) after start-up."""

    def __init__(self, config: uvicorn.Config, display_host: str) -> None:
        super().__init__(config)
        self.display_host = display_host

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        port = self.config.port
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
                break
        print(f"{READY_PREFIX}http://{self.display_host}:{port}", flush=True)


def run_server(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` until interrupted (Ctrl-C or SIGTERM: a graceful shutdown that closes the engine)."""
    # On SIGTERM, open streams get a few seconds to finish; then they are cut (and their engine requests aborted).
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_keep_alive=30, timeout_graceful_shutdown=5
    )
    # Announce an address a client can reach: the wildcard itself is not one.
    display = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    server = _Server(config, display)
    server.run()
    if server.started is False:
        sys.exit(1)
