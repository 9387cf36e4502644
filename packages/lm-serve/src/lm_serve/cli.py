"""`lm serve` (also the `lm-serve` script): the server commands, imported lazily by the `lm` command.

Nothing heavy is imported at module level: `lm serve --help` must not import fastapi or torch.
"""

from __future__ import annotations

import importlib

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup

# Subcommands that live in other modules, loaded only when used or listed.
_LAZY_COMMANDS = {"proxy": "lm_serve.proxy.cli:proxy"}


class ServeGroup(LMGroup):
    """The `serve` group: `api-server` here, `proxy` loaded from its own module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        found = super().get_command(ctx, name)
        if found is not None or name not in _LAZY_COMMANDS:
            return found
        module_name, _, attr = _LAZY_COMMANDS[name].partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise click.ClickException(f"command {name!r} could not be loaded: {exc}") from None


# Options that take several values after one flag (`--api-keys k1 k2`, as LMDeploy's; `--cuda-graph-sizes 1 2 4`,
# as vLLM's): click options take one value each, so each value is given its own copy of the flag.
_SEVERAL_VALUES = {"--api-keys", "--api_keys", "--cuda-graph-sizes", "--cuda_graph_sizes"}


class _ApiServerCommand(click.Command):
    """Lets the options of `_SEVERAL_VALUES` take several values after one flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in _SEVERAL_VALUES:
                flag = arg.replace("_", "-")
                i += 1
                taken = 0
                while i < len(args) and not args[i].startswith("-"):
                    rewritten += [flag, args[i]]
                    i += 1
                    taken += 1
                if not taken:
                    rewritten.append(arg)  # let click report the missing value
                continue
            rewritten.append(arg)
            i += 1
        return super().parse_args(ctx, rewritten)


@click.group(cls=ServeGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lm-serve", prog_name="lm-serve")
def serve() -> None:
    """Serve models over an OpenAI-compatible HTTP API."""


@serve.command("api-server", cls=_ApiServerCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("model_name", metavar="[MODEL]", required=False)
@click.option("--server-name", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--server-port", type=int, default=23333, show_default=True, help="Port (0: any free port).")
@click.option("--backend", default="auto", show_default=True, help="Engine: auto, torch, turbomind, ...")
@click.option(
    "--model-name",
    "served_model_name",
    help="The name clients use in `model` (default: MODEL as given, or the default model's name).",
)
@click.option(
    "--api-keys",
    multiple=True,
    help="Keys clients must send as 'Authorization: Bearer KEY' (several: --api-keys k1 k2); env LM_API_KEYS.",
)
@click.option("--tool-call-parser", help="How tool calls are written by this model (see docs/serving.md).")
@click.option("--reasoning-parser", help="How reasoning is delimited by this model, e.g. <think> tags.")
@click.option(
    "--max-concurrent-requests",
    type=click.IntRange(min=1),
    help="Most sequences (prompts x n, summed over requests) generated at once; a request beyond it gets 429.",
)
@click.option(
    "--max-sequences-per-request",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Most sequences (prompts x n) one request may ask for; a larger request gets 400.",
)
@click.option("--chat-template", help="A built-in template name or a .jinja/.json file (default: the model's own).")
@click.option("--allow-origins", multiple=True, help="CORS origins allowed to call the API (repeatable; '*' for all).")
@click.option(
    "--proxy-url",
    metavar="URL",
    help="Register with this `lm serve proxy` once listening, unregister at shutdown (see docs/proxy.md).",
)
@click.option(
    "--proxy-admin-key",
    envvar="LM_PROXY_ADMIN_KEY",
    show_envvar=True,
    help="The proxy's --admin-key, sent when registering with --proxy-url.",
)
@click.option(
    "--max-request-bytes",
    type=click.IntRange(min=1),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Largest request body; a larger one is refused with 413 before it is read.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On SIGTERM, seconds running requests get to finish before they are ended (503 / error event).",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Close a connection that has not sent a whole request head within this many seconds.",
)
@click.option(
    "--allow-special-tokens-in-content",
    is_flag=True,
    help="Text in messages that spells a special token (<|im_start|>) becomes that token, not text.",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
@click.option("--session-len", type=int, help="Longest prompt + generation in tokens (engine setting).")
@click.option("--max-batch-size", type=int, help="Most sequences decoded together (engine setting).")
@click.option("--cache-max-entry-count", type=float, help="Fraction of free memory for the KV cache.")
@click.option("--num-kv-blocks", type=int, help="Exact number of KV-cache blocks (overrides the fraction).")
@click.option("--block-size", type=int, help="Tokens per KV-cache block.")
@click.option("--quant-policy", type=int, help="KV cache quantized online: 0 off, 8 int8, 4 int4 (engine setting).")
@click.option("--max-prefill-token-num", type=int, help="Token budget of one engine step.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), help="Weights and compute.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the engine runs.")
@click.option("--disable-prefix-caching", is_flag=True, default=None, help="Do not reuse KV blocks across requests.")
@click.option("--eager-mode", is_flag=True, default=None, help="No CUDA graphs.")
@click.option(
    "--cuda-graph-sizes",
    type=click.IntRange(min=1),
    multiple=True,
    help="Decode batch sizes to capture as CUDA graphs (several: --cuda-graph-sizes 1 2 4 8); larger batches run "
    "eagerly (default: 1, 2, 4, 8, every 8 to 64, every 16 beyond).",
)
@click.option("--num-threads", type=click.IntRange(min=1), help="CPU threads for torch (engine setting).")
def api_server(
    model_name,
    server_name,
    server_port,
    backend,
    served_model_name,
    api_keys,
    tool_call_parser,
    reasoning_parser,
    max_concurrent_requests,
    max_sequences_per_request,
    chat_template,
    allow_origins,
    proxy_url,
    proxy_admin_key,
    max_request_bytes,
    shutdown_timeout,
    header_timeout,
    allow_special_tokens_in_content,
    log_level,
    **engine_options,
) -> None:
    """Serve MODEL (default: SmolLM2-135M-Instruct) over an OpenAI-compatible API."""
    from lm_core.async_pipeline import AsyncPipeline
    from lm_core.resolve import DEFAULT_MODEL
    from lm_serve.app import build_app, check_parser_names
    from lm_serve.auth import api_keys_from
    from lm_serve.launch import run_server
    from lm_serve.proxy.nodes import normalize_node_url

    try:
        # Bad names and URLs fail before the minutes a big model takes to load.
        check_parser_names(tool_call_parser, reasoning_parser)
        proxy_url = normalize_node_url(proxy_url, "proxy_url") if proxy_url is not None else None
        pipe = AsyncPipeline.from_model(model_name, backend, engine_config(engine_options) or None, chat_template)
        app = build_app(
            pipe,
            [served_model_name or model_name or DEFAULT_MODEL],
            api_keys=api_keys_from(api_keys),
            tool_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
            max_concurrent_requests=max_concurrent_requests,
            max_sequences_per_request=max_sequences_per_request,
            allow_origins=allow_origins,
            max_request_bytes=max_request_bytes,
            allow_special_tokens_in_content=allow_special_tokens_in_content,
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    run_server(
        app,
        server_name,
        server_port,
        log_level,
        proxy_url=proxy_url,
        proxy_admin_key=proxy_admin_key,
        shutdown_timeout=shutdown_timeout,
        header_timeout=header_timeout,
        on_shutdown_timeout=app.state.lm.end_running_requests,
    )


def engine_config(options: dict) -> dict:
    """The engine settings given on the command line, as the dict `backend_config` takes."""
    config = {k: v for k, v in options.items() if v not in (None, ()) and k != "disable_prefix_caching"}
    if "cuda_graph_sizes" in config:
        config["cuda_graph_sizes"] = list(config["cuda_graph_sizes"])
    if options.get("disable_prefix_caching"):
        config["enable_prefix_caching"] = False
    return config


def main() -> None:
    """Entry point of the `lm-serve` script."""
    serve.main(prog_name="lm-serve")
