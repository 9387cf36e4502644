"""The `lm serve` commands: help without heavy imports, flags, and the flags of several values (`--api-keys k1 k2`)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from lm_serve.cli import api_server, engine_config, serve


def test_help_lists_commands_without_importing_fastapi_or_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from lm_serve.cli import serve\n"
        "for args in (['--help'], ['api-server', '--help'], ['api_server', '--help']):\n"
        "    result = CliRunner().invoke(serve, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "    print(result.output)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'uvicorn', 'transformers'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert "api-server" in out.stdout and "proxy" in out.stdout
    for flag in (
        "--server-name",
        "--server-port",
        "--backend",
        "--api-keys",
        "--tool-call-parser",
        "--reasoning-parser",
        "--max-concurrent-requests",
        "--session-len",
        "--num-kv-blocks",
    ):
        assert flag in out.stdout


def test_api_keys_take_several_values_and_underscores_work():
    ctx = api_server.make_context(
        "api-server", ["some/model", "--api_keys", "k1", "k2", "--server_port", "8000", "--session-len", "128"]
    )
    assert ctx.params["model_name"] == "some/model"
    assert ctx.params["api_keys"] == ("k1", "k2")
    assert ctx.params["server_port"] == 8000
    assert engine_config({"session_len": 128, "dtype": None, "disable_prefix_caching": True}) == {
        "session_len": 128,
        "enable_prefix_caching": False,
    }


def test_cuda_graph_sizes_take_several_values():
    ctx = api_server.make_context("api-server", ["m", "--cuda-graph-sizes", "1", "8", "32", "--max-batch-size", "32"])
    assert ctx.params["cuda_graph_sizes"] == (1, 8, 32)
    options = {k: v for k, v in ctx.params.items() if k in ("cuda_graph_sizes", "max_batch_size", "eager_mode")}
    assert engine_config(options) == {"cuda_graph_sizes": [1, 8, 32], "max_batch_size": 32}
    assert "cuda_graph_sizes" not in engine_config(api_server.make_context("api-server", ["m"]).params)
    with pytest.raises(click.BadParameter):
        api_server.make_context("api-server", ["m", "--cuda_graph_sizes", "0"])


def test_unknown_parser_fails_before_loading_the_model():
    from click.testing import CliRunner

    result = CliRunner().invoke(serve, ["api-server", "/nonexistent", "--tool-call-parser", "no-such-parser"])
    assert result.exit_code != 0
    assert "no-such-parser" in result.output and "known" in result.output
