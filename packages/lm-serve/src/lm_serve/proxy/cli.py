"""`lm serve proxy`: one address in front of several api_servers. Imports nothing heavy until the command runs."""

from __future__ import annotations

import click

from lm_serve.proxy.nodes import ROUTING_STRATEGIES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@click.command("proxy")
@click.argument("node_urls", metavar="[NODE_URL]...", nargs=-1)
@click.option("--server-name", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--server-port", type=int, default=8000, show_default=True, help="Port to listen on (0: any free one).")
@click.option(
    "--nodes",
    multiple=True,
    metavar="URL",
    help="api_server base URLs (repeat the flag, or separate with commas); more may register via POST /nodes/add.",
)
@click.option(
    "--routing-strategy",
    type=click.Choice(ROUTING_STRATEGIES),
    default="least_load",
    show_default=True,
    help="least_load: the node with the fewest requests in flight through this proxy; round_robin: each in turn.",
)
@click.option("--health-interval", type=float, default=5.0, show_default=True, help="Seconds between health checks.")
@click.option("--health-timeout", type=float, default=10.0, show_default=True, help="Seconds one check may take.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="warning", show_default=True)
def proxy(node_urls, server_name, server_port, nodes, routing_strategy, health_interval, health_timeout, log_level):
    """Route OpenAI requests across api_servers by load, checking their health.

    Nodes are given as NODE_URL arguments or --nodes, or register themselves (`lm serve api_server --proxy-url`).
    Streams are relayed as they arrive; a node that cannot be reached is skipped until its health check passes.
    """
    from lm_serve.proxy.nodes import ProxyConfig

    urls = [url for value in (*node_urls, *nodes) for url in value.split(",") if url.strip()]
    try:
        config = ProxyConfig(
            nodes=urls,
            routing_strategy=routing_strategy,
            health_interval=health_interval,
            health_timeout=health_timeout,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not 0 <= server_port <= 65535:
        raise click.BadParameter(f"server_port: expected 0..65535, got {server_port}")
    run_proxy(config, server_name, server_port, log_level)


def run_proxy(config, host: str, port: int, log_level: str = "warning") -> None:
    """Serve the proxy for `config` at host:port until interrupted; prints the ready line once it accepts requests."""
    import uvicorn

    from lm_serve.proxy.app import create_app

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                # With --server-port 0 the ready line names the port the system chose.
                bound = self.servers[0].sockets[0].getsockname()[1]
                click.echo(f"lm-serve proxy: ready at http://{shown}:{bound}")

    # Announce an address a client can reach: the wildcard itself is not one.
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)

    app = create_app(config)
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
