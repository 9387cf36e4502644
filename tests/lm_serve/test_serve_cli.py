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
    args = ["some/model", "--api_keys", "k1", "k2", "--server_port", "8000", "--session-len", "128"]
    ctx = api_server.make_context("api-server", [*args, "--disable-prefix-caching"])
    assert ctx.params["model_name"] == "some/model"
    assert ctx.params["api_keys"] == ("k1", "k2")
    assert ctx.params["server_port"] == 8000
    assert engine_config(ctx.params) == {"session_len": 128, "enable_prefix_caching": False}


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


def test_api_keys_stop_at_a_model(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    ctx = api_server.make_context("api-server", ["--api-keys", "k1", str(model), "--server-port", "8000"])
    assert (ctx.params["api_keys"], ctx.params["model_name"]) == (("k1",), str(model))
    ctx = api_server.make_context("api-server", ["--api-keys", "k1", "k2", "org/model-name"])
    assert (ctx.params["api_keys"], ctx.params["model_name"]) == (("k1", "k2"), "org/model-name")
    ctx = api_server.make_context("api-server", [str(model), "--api-keys", "k1", "k2"])
    assert (ctx.params["api_keys"], ctx.params["model_name"]) == (("k1", "k2"), str(model))


def test_log_level_and_prefix_caching_flags_as_lmdeploy_spells_them():
    ctx = api_server.make_context("api-server", ["--log-level", "INFO", "--enable-prefix-caching"])
    assert ctx.params["log_level"].lower() == "info"
    assert engine_config(ctx.params) == {"enable_prefix_caching": True}
    ctx = api_server.make_context("api-server", ["--log_level", "Debug", "--backend", "pytorch"])
    assert ctx.params["log_level"].lower() == "debug" and ctx.params["backend"] == "torch"


# torch and lm-torch's engine made unimportable: a server that got as far as loading the engine would fail with an
# ImportError, so an error from these shows the check ran before the model loads.
_NO_ENGINE = (
    "import sys; sys.modules['torch'] = None; sys.modules['lm_torch.engine'] = None; "
    "from lm_serve.cli import main; main()"
)


def _one_error_line(args: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _NO_ENGINE, "api-server", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_ports_fail_before_loading_the_model():
    import socket

    assert "'--server-port': 99999 is not in the range 0<=x<=65535" in _one_error_line(["--server-port", "99999"])
    assert "'--server-port'" in _one_error_line(["--server-port", "http"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_error_line(["--server-name", "127.0.0.1", "--server-port", str(port)])
    assert f"cannot listen on 127.0.0.1:{port}: it is already in use" in line


def test_unknown_chat_template_and_backends_fail_before_loading_the_model(default_model_dir):
    assert "unknown chat template 'nosuch'" in _one_error_line(["--server-port", "0", "--chat-template", "nosuch"])
    assert "cannot generate yet" in _one_error_line(["--backend", "turbomind"])
    assert "exceeds the model's context length" in _one_error_line(["--server-port", "0", "--session-len", "1000000"])
