"""`lm serve` (also the `lm-serve` script): the server commands, imported lazily by the `lm` command.

Nothing heavy is imported at module level: `lm serve --help` must not import fastapi or torch.
"""

from __future__ import annotations

import errno
import importlib
from typing import Any

import click

from lm_core.cli.base import CONTEXT_SETTINGS, LMGroup
from lm_core.cli.engine_options import SEVERAL_VALUES, SeveralValuesCommand, engine_config, engine_options

# Subcommands that live in other modules, loaded only when used or listed.
_LAZY_COMMANDS = {"proxy": "lm_serve.proxy.cli:proxy"}


class ServeGroup(LMGroup):
    """The `serve` group: `api-server` here, `proxy` loaded from its own module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands defined here and the lazily loaded ones."""
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """`name`'s command, importing a lazily loaded one now."""
        found = super().get_command(ctx, name)
        if found is not None or name not in _LAZY_COMMANDS:
            return found
        module_name, _, attr = _LAZY_COMMANDS[name].partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise click.ClickException(f"command {name!r} could not be loaded: {exc}") from None


class _ApiServerCommand(SeveralValuesCommand):
    """`--api-keys k1 k2` (as LMDeploy's) and the engine's `--cuda-graph-sizes 1 2 4` take several values; a value
    that names a model (`--api-keys k1 ./model.gguf`) ends the list and is the MODEL argument."""

    several_values = (*SEVERAL_VALUES, "--api-keys", "--allowed-media-domains")


@click.group(cls=ServeGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="lm-serve", prog_name="lm-serve")
def serve() -> None:
    """Serve models over an OpenAI-compatible HTTP API."""


@serve.command("api-server", cls=_ApiServerCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("model_name", metavar="[MODEL]", required=False)
@click.option("--server-name", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--server-port", type=click.IntRange(0, 65535), default=23333, show_default=True, help="Port (0: any free port)."
)
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
    "--allowed-media-domains",
    multiple=True,
    help="Hosts image and video URLs may name (exact, or '*.domain' for its subdomains); default: any public host.",
)
@click.option(
    "--allowed-local-media-path",
    type=click.Path(exists=True, file_okay=False, resolve_path=True),
    help="A directory whose files requests may name as images (file: URLs and paths); default: none.",
)
@click.option(
    "--media-max-bytes",
    type=click.IntRange(min=1),
    default=20 * 1024 * 1024,
    show_default=True,
    help="Largest image fetched from a URL; a larger one fails the request with 422.",
)
@click.option(
    "--max-image-pixels",
    type=click.IntRange(min=1),
    help="Most pixels an image may have, read from its header before decoding (default: Pillow's bomb limit).",
)
@click.option(
    "--limit-mm-per-prompt",
    metavar="N|JSON",
    help='Most images and videos in one request: a count, or JSON per modality {"image": 4, "video": 1} (default 8).',
)
@click.option("--test-allow-loopback-media", is_flag=True, hidden=True)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"], case_sensitive=False),
    help="Any case (INFO or info).",
)
@engine_options
def api_server(
    model_name,
    server_name,
    server_port,
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
    allowed_media_domains,
    allowed_local_media_path,
    media_max_bytes,
    max_image_pixels,
    limit_mm_per_prompt,
    test_allow_loopback_media,
    log_level,
    **options,
) -> None:
    """Serve MODEL (default: SmolLM2-135M-Instruct) over an OpenAI-compatible API."""
    from lm_core.async_pipeline import AsyncPipeline
    from lm_core.resolve import DEFAULT_MODEL
    from lm_serve.app import build_app, check_parser_names
    from lm_serve.auth import api_keys_from
    from lm_serve.launch import run_server
    from lm_serve.proxy.nodes import normalize_node_url

    try:
        # Bad names, URLs and ports fail before the minutes a big model takes to load.
        check_parser_names(tool_call_parser, reasoning_parser)
        proxy_url = normalize_node_url(proxy_url, "proxy_url") if proxy_url is not None else None
        check_listen_address(server_name, server_port)
        policy = media_policy(
            allowed_media_domains, allowed_local_media_path, media_max_bytes, max_image_pixels, limit_mm_per_prompt
        )
        if test_allow_loopback_media:  # hidden, for the test suite's loopback media server only
            import dataclasses

            click.echo("lm-serve: WARNING: image URLs may reach loopback addresses (a test setting)", err=True)
            policy = dataclasses.replace(cast_policy(policy), allow_loopback_for_tests=True)
        pipe = AsyncPipeline.from_model(
            model_name, options["backend"], engine_config(options) or None, chat_template, media_policy=policy
        )
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
        log_level.lower(),
        proxy_url=proxy_url,
        proxy_admin_key=proxy_admin_key,
        shutdown_timeout=shutdown_timeout,
        header_timeout=header_timeout,
        on_shutdown_timeout=app.state.lm.end_running_requests,
    )


def media_policy(
    domains: tuple[str, ...],
    local_path: str | None,
    max_bytes: int,
    max_pixels: int | None,
    limit: str | None,
) -> object:
    """The `lm_vl.MediaPolicy` of the media flags (lm-vl's strict defaults where a flag is not given); None when lm-vl
    is not installed and no media flag asks for it (text-only serving needs no lm-vl). ValueError names a bad flag."""
    import json

    options: dict[str, object] = {"max_bytes": max_bytes}
    if domains:
        options["allowed_media_domains"] = list(domains)
    if local_path is not None:
        options["allowed_local_media_path"] = local_path
    if max_pixels is not None:
        options["max_image_pixels"] = max_pixels
    if limit is not None:
        try:
            value = json.loads(limit)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            options["limit_per_prompt"] = value
        elif isinstance(value, dict) and value:
            counts = [v for v in value.values() if isinstance(v, int) and not isinstance(v, bool)]
            options["limit_per_modality"] = value
            options["limit_per_prompt"] = max(sum(counts), 1)
        else:
            raise ValueError(f'--limit-mm-per-prompt: expected a count >= 1 or JSON like {{"image": 4}}, got {limit!r}')
    try:
        from lm_vl.media import MediaPolicy
    except ImportError:
        if set(options) != {"max_bytes"} or max_bytes != 20 * 1024 * 1024:
            raise ValueError("the media flags need lm-vl, which is not installed: pip install lm-vl") from None
        return None
    return MediaPolicy(**options)  # pyright: ignore[reportArgumentType]


def cast_policy(policy: object) -> Any:
    """`policy`, or lm-vl's default `MediaPolicy` for None (the hidden test switch needs one to modify)."""
    if policy is not None:
        return policy
    from lm_vl.media import MediaPolicy

    return MediaPolicy()


def check_listen_address(host: str, port: int) -> None:
    """A ValueError when this process cannot listen on `host`:`port` (unknown host, port taken or not allowed).

    The test socket gets the options uvicorn's own gets (SO_REUSEADDR), so a port that uvicorn could bind passes.
    """
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"--server-name {host!r} is no address of this machine: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            reason = "it is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ValueError(f"cannot listen on {host}:{port}: {reason} (choose another --server-port)") from None


def main() -> None:
    """Entry point of the `lm-serve` script."""
    serve.main(prog_name="lm-serve")
