"""The whole toolkit installed through the meta-package: one `lm` command that finds every package's commands."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys

import pytest

GROUPS = {"chat", "check-env", "model", "serve", "lite"}


def lm(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("lm")
    assert script is not None, "the meta-package did not install the lm script"
    return subprocess.run([script, *args], capture_output=True, text=True)


def test_lm_help_lists_every_package_group():
    result = lm("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed >= GROUPS


@pytest.mark.parametrize(
    "args", [["--help"], ["chat", "--help"], ["serve", "--help"], ["lite", "--help"], ["model", "info", "--help"]]
)
def test_help_never_imports_torch(args):
    code = (
        "import sys\nfrom lm_deploy.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_check_env_reports_every_installed_package():
    result = lm("check_env")
    assert result.returncode == 0, result.stderr
    # Rows are "key<two or more spaces>value"; keys may hold single spaces ("CUDA available").
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines() if line.strip())
    for dist in ("lm-deploy", "lm-core", "lm-torch", "lm-turbomind", "lm-lite", "lm-vl", "lm-serve"):
        assert rows[dist].strip() == importlib.metadata.version(dist)
    assert rows["torch"].strip() == importlib.metadata.version("torch")


def test_meta_package_reexports_resolution():
    import lm_core
    import lm_deploy

    assert lm_deploy.resolve_model is lm_core.resolve_model
    assert lm_deploy.pipeline is lm_core.pipeline and lm_deploy.GenerationConfig is lm_core.GenerationConfig
    assert lm_deploy.__version__ == importlib.metadata.version("lm-deploy")


def test_bad_model_is_one_line_error_from_lm(tmp_path):
    result = lm("model", "resolve", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: no such model file or directory: {tmp_path / 'nope'}"
