"""`lm serve proxy`: one address in front of several api_servers. Imports nothing heavy until the command runs."""

from __future__ import annotations

import click

from lm_serve.proxy.nodes import LMDEPLOY_STRATEGIES, ROUTING_STRATEGIES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
ADMIN_KEY_ENV = "LM_PROXY_ADMIN_KEY"
NO_ADMIN_KEY_LINE = (
    "lm-serve proxy: node management over HTTP (/nodes, /nodes/add, /nodes/remove) is disabled: "
    f"give --admin-key (or {ADMIN_KEY_ENV}) to let servers register"
)


class RoutingStrategy(click.ParamType):
    """A routing strategy by our name or LMDeploy's ('-' and '_' alike, any case)."""

    name = "strategy"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        """Lists every accepted strategy name, ours then LMDeploy's, in `--help`."""
        return "[" + "|".join(dict.fromkeys((*ROUTING_STRATEGIES, *LMDEPLOY_STRATEGIES))) + "]"

    def convert(self, value, param, ctx) -> str:
        """The strategy under our name; a click usage error naming the choices when unknown."""
        from lm_serve.proxy.nodes import routing_strategy_from

        try:
            return routing_strategy_from(value, param.name if param else "routing_strategy")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ProxyCommand(click.Command):
    """Lets `--api-keys` take several values after one flag (`--api-keys k1 k2`, as LMDeploy's), up to the next flag
    or the first value that is a URL (a NODE_URL argument, never a key)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Rewrites `--api-keys k1 k2` into one `--api-keys` per key, then parses as usual."""
        rewritten: list[str] = []
        i = 0
        while i < len(args):
            if args[i] not in ("--api-keys", "--api_keys"):
                rewritten.append(args[i])
                i += 1
                continue
            i += 1
            taken = 0
            while i < len(args) and not args[i].startswith("-") and (taken == 0 or "://" not in args[i]):
                rewritten += ["--api-keys", args[i]]
                i += 1
                taken += 1
            if not taken:
                rewritten.append("--api-keys")  # let click report the missing value
        return super().parse_args(ctx, rewritten)


@click.command("proxy", cls=ProxyCommand)
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
    "--strategy",
    "routing_strategy",
    type=RoutingStrategy(),
    default="least_load",
    show_default=True,
    help="least_load: the node with the fewest requests in flight through this proxy; round_robin: each in turn; "
    "random: a node at random; least_latency: the node whose last 15 requests took the least time on average. "
    "LMDeploy's names: min_expected_latency means least_load (the nodes declare no speeds), random means random, "
    "min_observed_latency means least_latency.",
)
@click.option(
    "--api-keys",
    multiple=True,
    help="Keys clients must send as 'Authorization: Bearer KEY' (several: --api-keys k1 k2); env LM_API_KEYS. The "
    "proxy checks them itself and forwards the header, so nodes holding the same keys accept it.",
)
@click.option(
    "--admin-key",
    envvar=ADMIN_KEY_ENV,
    show_envvar=True,
    help="Key node management (/nodes, /nodes/add, /nodes/remove) requires; without it those routes answer 403. "
    "api_servers pass it with --proxy-admin-key.",
)
@click.option("--health-interval", type=float, default=5.0, show_default=True, help="Seconds between health checks.")
@click.option(
    "--health-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds one check may take; a node that does not answer in time is unhealthy, and its requests that have "
    "no answer yet go to another node.",
)
@click.option(
    "--connect-timeout", type=float, default=5.0, show_default=True, help="Seconds to open a connection to a node."
)
@click.option(
    "--read-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Longest a node may go without sending a byte (a non-streamed answer must come whole within it; a stream "
    "may run longer as long as it keeps sending).",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="warning", show_default=True)
def proxy(
    node_urls,
    server_name,
    server_port,
    nodes,
    routing_strategy,
    api_keys,
    admin_key,
    health_interval,
    health_timeout,
    connect_timeout,
    read_timeout,
    log_level,
):
    """Route OpenAI requests across api_servers by load, checking their health.

    Nodes are given as NODE_URL arguments or --nodes, or register themselves (`lm serve api_server --proxy-url
    URL --proxy-admin-key KEY`, with the proxy's --admin-key). Streams are relayed as they arrive; a node that cannot
    be reached or stops answering is skipped until its health check passes.
    """
    from lm_serve.auth import api_keys_from
    from lm_serve.proxy.nodes import ProxyConfig

    urls = [url for value in (*node_urls, *nodes) for url in value.split(",") if url.strip()]
    try:
        config = ProxyConfig(
            nodes=urls,
            routing_strategy=routing_strategy,
            health_interval=health_interval,
            health_timeout=health_timeout,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            api_keys=api_keys_from(api_keys),
            admin_key=admin_key or None,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not 0 <= server_port <= 65535:
        raise click.BadParameter(f"server_port: expected 0..65535, got {server_port}")
    run_proxy(config, server_name, server_port, log_level.lower())


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
                if config.admin_key is None:
                    click.echo(NO_ADMIN_KEY_LINE)
                click.echo(f"lm-serve proxy: ready at http://{shown}:{bound}")

    # Announce an address a client can reach: the wildcard itself is not one.
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)

    app = create_app(config)
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
