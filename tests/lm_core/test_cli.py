"""The `lm` dispatcher as lm-core alone provides it (`python -m lm_core`): lazy commands and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

HEAVY_MODULES = ("torch", "transformers", "safetensors", "gguf", "numpy")


def run_lm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm_core", *args], capture_output=True, text=True, env=env)


def imported_by_help(args: list[str]) -> set[str]:
    """Heavy modules imported while the CLI prints `args` help."""
    code = (
        "import sys\nfrom lm_core.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        f"print('\\nLOADED', [m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(eval(out.rsplit("LOADED", 1)[1]))  # our own printed list literal


def test_import_lm_core_leaves_torch_out():
    code = "import sys, lm_core; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_commands_without_heavy_imports():
    result = run_lm("--help")
    assert result.returncode == 0, result.stderr
    assert "check-env" in result.stdout and "model" in result.stdout
    assert imported_by_help(["--help"]) == set()


def test_every_command_help_is_light():
    listing = subprocess.run(
        [
            sys.executable,
            "-c",
            "from lm_core.cli import cli; import click; print(cli.list_commands(click.Context(cli)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = eval(listing)
    assert {"check-env", "model"} <= set(commands)
    for command in commands:
        assert imported_by_help([command, "--help"]) == set(), command
    assert imported_by_help(["model", "info", "--help"]) == set()


def test_underscore_and_dash_spellings_are_the_same_command():
    dashed, underscored = run_lm("check-env"), run_lm("check_env")
    assert dashed.returncode == underscored.returncode == 0, dashed.stderr + underscored.stderr
    assert "lm-core" in dashed.stdout and "Python" in dashed.stdout
    assert dashed.stdout.splitlines()[0] == underscored.stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("/no/such/dir", "no such model file or directory: /no/such/dir"),
        ("/no/such/model.gguf", "no such model file or directory"),
        ("{tmp}", "has no config.json"),
        ("{tmp}/broken.gguf", "truncated or corrupt"),
        ("lm-deploy-tests/missing", "HF_HUB_OFFLINE is set"),
    ],
)
def test_bad_model_argument_is_one_line_error(tmp_path, arg, message):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "LM_DEPLOY_CACHE": str(tmp_path / "cache")}
    result = run_lm("model", "resolve", arg.format(tmp=tmp_path), env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]


@pytest.mark.slow
def test_model_info_loads_the_default_model(default_model_dir):
    from safetensors import safe_open

    result = run_lm("model", "info")
    assert result.returncode == 0, result.stderr
    summary = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in result.stdout.splitlines())
    assert summary["path"] == str(default_model_dir)
    with safe_open(default_model_dir / "model.safetensors", framework="numpy") as f:
        total = sum(f.get_tensor(k).size for k in f.keys())  # noqa: SIM118
    assert summary["parameters"] == f"{total / 1e6:.1f}M"
    config = json.loads((default_model_dir / "config.json").read_text())
    assert summary["architecture"] == config["architectures"][0]
    assert summary["chat template"].startswith("yes")


def test_distribution(package_checks):
    package_checks.distribution("lm-core", "lm_core")


# -- engine flags, checked before any model loads ------------------------------------------------------------------

# torch and lm-torch's engine made unimportable (its torch-free config, which declares the flags, stays): a command
# that got as far as loading an engine would fail with an ImportError instead of the expected message, so these
# show the checks run before the engine (and its weights) load.
_NO_ENGINE = (
    "import sys; sys.modules['torch'] = None; sys.modules['lm_torch.engine'] = None; "
    "from lm_core.cli import main; main()"
)


def run_without_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_ENGINE, *args], capture_output=True, text=True, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "'--temperature': -1.0 is not in the range x>=0"),
        (["--top-p", "2"], "'--top-p': 2.0 is not in the range 0<x<=1"),
        (["--top-k", "-3"], "'--top-k': -3 is not in the range x>=0"),
        (["--backend", "nosuch"], "unknown backend 'nosuch'"),
        (["--backend", "turbomind"], "the turbomind engine (lm-turbomind) cannot generate yet"),
        (["--chat-template", "nosuch"], "unknown chat template 'nosuch'"),
    ],
)
def test_chat_rejects_bad_flags_before_loading(default_model_dir, args, message):
    lines = error_lines(run_without_engine("chat", *args, "--prompt", "hi"))
    assert len(lines) == 1 and message in lines[0], lines


def test_backend_pytorch_names_the_torch_engine():
    from lm_core.engine_registry import canonical_backend, get_engine_class

    lm_torch_engine = pytest.importorskip("lm_torch.engine")
    assert canonical_backend("pytorch") == canonical_backend("PyTorch") == "torch"
    assert get_engine_class("pytorch") is lm_torch_engine.TorchEngine


def test_version_names_lm_deploy_and_the_lm_packages():
    from importlib.metadata import PackageNotFoundError, version

    result = run_lm("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    try:  # lm-core's own test session installs lm-core without the meta-package
        head = f"lm-deploy {version('lm-deploy')} ("
    except PackageNotFoundError:
        head = "lm-deploy (meta-package not installed) ("
    assert line.startswith(head), line
    assert f"lm-core {version('lm-core')}" in line


class _Chat:
    """`lm chat` in a subprocess, its stdout collected as it comes (prompts end without a newline)."""

    def __init__(self, *args: str) -> None:
        import os
        import threading

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lm_core", "chat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.text = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while char := self.process.stdout.read(1):
            self.text += char

    def wait_for(self, predicate, timeout: float = 300) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"waited in vain; output so far:\n{self.text}\n{self.process.stderr.read()}")
            time.sleep(0.05)

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_ctrl_c_at_the_prompt_leaves(default_model_dir):
    import signal

    pytest.importorskip("lm_torch")
    flags = ["--num-threads", "1", "--session-len", "2048", "--num-kv-blocks", "160", "--max-new-tokens", "1500"]
    chat = _Chat(str(default_model_dir), *flags)
    try:
        chat.wait_for(lambda text: text.endswith(">>> "))
        start = len(chat.text)
        chat.send("Count from 1 to 400, one number per line.")
        chat.wait_for(lambda text: len(text) > start + 8)  # the answer is being written
        chat.process.send_signal(signal.SIGINT)
        chat.wait_for(lambda text: "(stopped)" in text[start:] and text.endswith(">>> "))
        assert chat.process.poll() is None  # still in the REPL
        # The REPL goes on answering (the stopped request was aborted, not left holding the engine).
        start = len(chat.text)
        chat.send("What is the capital of France?")
        chat.wait_for(lambda text: text[start:].endswith(">>> "))
        assert "Paris" in chat.text[start:]
        chat.process.send_signal(signal.SIGINT)  # at the prompt: leave
        assert chat.process.wait(60) == 0
        assert "Traceback" not in chat.process.stderr.read()
    finally:
        if chat.process.poll() is None:
            chat.process.kill()
