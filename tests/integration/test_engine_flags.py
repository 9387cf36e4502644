"""The engine flags of `lm chat` and `lm serve api_server`: declared once, by lm-torch's config, and checked before
any model loads. They need lm-core, lm-torch and lm-serve together, hence an integration test (lm-core's own tests
run without lm-torch, where the commands keep their generic flags only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.lm_core.test_cli import error_lines, run_without_engine


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--session-len", "0"], "'--session-len': 0 is not in the range x>=2"),
        (["--cache-max-entry-count", "1.5"], "'--cache-max-entry-count': 1.5 is not in the range 0<x<=1"),
        (["--quant-policy", "3"], "'--quant-policy': '3' is not one of '0', '4', '8'"),
        (["--session-len", "100000"], "session_len 100000 exceeds the model's context length 8192"),
    ],
)
def test_chat_rejects_bad_engine_flags_before_loading(default_model_dir, args, message):
    lines = error_lines(run_without_engine("chat", *args, "--prompt", "hi"))
    assert len(lines) == 1 and message in lines[0], lines


def test_chat_and_api_server_declare_the_same_engine_flags():
    from lm_core.cli.chat import chat
    from lm_core.cli.engine_options import ENGINE_OPTION_NAMES

    serve_cli = pytest.importorskip("lm_serve.cli")

    def declared(command) -> dict:
        params = {p.name: p for p in command.params}
        return {
            name: (params[name].opts, params[name].secondary_opts, repr(params[name].type), params[name].help)
            for name in ("backend", *ENGINE_OPTION_NAMES)
        }

    assert declared(chat) == declared(serve_cli.api_server)


def test_chat_takes_lmdeploy_engine_flags():
    from lm_core.cli.chat import chat
    from lm_core.cli.engine_options import engine_config

    args = ["--dtype", "float32", "--device", "cpu", "--cache-max-entry-count", "0.5", "--quant-policy", "8"]
    args += ["--num-threads", "2", "--session-len", "1024", "--max-batch-size", "4", "--cache-block-seq-len", "32"]
    args += ["--enable-prefix-caching", "--max_prefill_token_num", "512", "--cuda-graph-sizes", "1", "2"]
    ctx = chat.make_context("chat", ["some-model.gguf", *args])
    assert ctx.params["model_name"] == "some-model.gguf"
    assert engine_config(ctx.params) == {
        "dtype": "float32",
        "device": "cpu",
        "cache_max_entry_count": 0.5,
        "quant_policy": 8,
        "num_threads": 2,
        "session_len": 1024,
        "max_batch_size": 4,
        "block_size": 32,
        "enable_prefix_caching": True,
        "max_prefill_token_num": 512,
        "cuda_graph_sizes": [1, 2],
    }
    assert engine_config(chat.make_context("chat", ["--block-size", "64"]).params) == {"block_size": 64}
    assert engine_config(chat.make_context("chat", ["--disable-prefix-caching"]).params) == {
        "enable_prefix_caching": False
    }
    assert engine_config(chat.make_context("chat", []).params) == {}


def test_engine_flags_come_from_the_engine_config_without_torch():
    """The flags are the options lm-torch's config declares; building the CLI imports no torch, and without lm-torch
    the commands keep their generic flags only."""
    from lm_core.cli.engine_options import ENGINE_OPTION_NAMES
    from lm_torch.config import engine_options

    assert tuple(spec.name for spec in engine_options()) == ENGINE_OPTION_NAMES
    code = (
        "import sys\nfrom lm_core.cli.chat import chat\nfrom lm_serve.cli import api_server\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "print(sorted(p.name for p in chat.params if p.name in ('block_size', 'session_len', 'backend')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["[]", "['backend', 'block_size', 'session_len']"]
    code = "import sys; sys.modules['lm_torch'] = None\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["[]", "['backend']"]
    help_text = run_without_engine("chat", "--help")
    assert help_text.returncode == 0 and "--backend" in help_text.stdout


def _run_lm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    code = "from lm_core.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_dir, tiny_models):
    return tiny_models.make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


def test_chat_runs_with_tensor_parallel_ranks(tiny_llama):
    result = _run_lm(
        "chat", str(tiny_llama), "--tp", "2", "--session-len", "256", "--prompt", "Hello", "--max-new-tokens", "4"
    )
    assert result.returncode == 0, result.stderr
    assert "2 processes (tensor parallel 2 over gloo; this is rank 0)" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "3"], "--tp 3 does not divide the model's num_attention_heads (4)"),
        (["--tp", "2", "--devices", "0", "1"], "--devices names CUDA devices, but the engine runs on the CPU"),
        (["--tp", "2", "--nnodes", "2"], "dist_init_addr must be node 0's host:port when nnodes > 1"),
        (["--tp", "3", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:29999"], "must be a multiple of nnodes"),
        (["--dist-init-addr", "nowhere"], "dist_init_addr must be 'host:port'"),
    ],
)
def test_bad_parallel_flags_fail_in_one_line(tiny_llama, args, message):
    lines = error_lines(_run_lm("chat", str(tiny_llama), "--session-len", "256", *args, "--prompt", "hi"))
    assert len(lines) == 1 and message in lines[0], lines


def test_a_node_that_never_joins_fails_in_one_line(tiny_llama):
    from lm_torch.distributed.executor import free_port

    args = ["--tp", "2", "--nnodes", "2", "--node-rank", "0", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    lines = error_lines(
        _run_lm(
            "chat", str(tiny_llama), "--session-len", "256", *args, "--dist-timeout", "5", "--prompt", "hi", timeout=120
        )
    )
    assert len(lines) == 1 and "did not all meet" in lines[0] and "--nnodes" in lines[0], lines
