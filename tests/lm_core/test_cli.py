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
