"""Checks every package's test folder runs against its own installed distribution."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Triton's `@jit` decides when a function is defined whether it runs compiled or in the interpreter, and triton's own
# library functions (`tl.cdiv`, ...) are defined when triton is first imported. Without CUDA the kernel tests run
# in the interpreter (tests/lm_torch/kernels/conftest.py), so the switch must be on before any test module (or a
# library it imports, such as xgrammar) imports triton: here, the first conftest pytest loads.
if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def check_distribution(dist: str, import_name: str) -> None:
    """`import_name.__version__` is `dist`'s version, and every lm sibling it requires is installed in range."""
    from packaging.requirements import Requirement

    module = importlib.import_module(import_name)
    assert module.__version__ == importlib.metadata.version(dist)
    for spec in importlib.metadata.requires(dist) or []:
        req = Requirement(spec)
        if re.fullmatch(r"lm-[a-z]+", req.name) and not req.marker:
            installed = importlib.metadata.version(req.name)
            assert req.specifier.contains(installed), f"{req} does not admit installed {req.name} {installed}"


def check_cli_group(script: str, group: str) -> None:
    """The package's own script and `lm GROUP` both answer --help."""
    path = shutil.which(script)
    assert path is not None, f"the {script} script is not installed"
    own = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert own.returncode == 0 and f"Usage: {script}" in own.stdout, own.stderr
    via_lm = subprocess.run([sys.executable, "-m", "lm_core", group, "--help"], capture_output=True, text=True)
    assert via_lm.returncode == 0 and f"Usage: lm {group}" in via_lm.stdout, via_lm.stderr


@pytest.fixture(scope="session")
def package_checks():
    """`package_checks.distribution(dist, import_name)` and `package_checks.cli_group(script, group)`."""
    return type(
        "PackageChecks",
        (),
        {"distribution": staticmethod(check_distribution), "cli_group": staticmethod(check_cli_group)},
    )


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (fetched and converted once per cache)."""
    from lm_core import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's original Q4_1 GGUF file."""
    from lm_core.resolve import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def tiny_models():
    """`tests/lm_lite/tiny_models.py` (tiny random checkpoints of every family, and a random Llama for engine
    comparisons, all with the default model's tokenizer), loaded by path: test modules cannot import each other."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lm_lite_tiny_models", Path(__file__).parent / "lm_lite" / "tiny_models.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_vlms():
    """`tests/integration/tiny_vlms.py` (tiny random vision-language checkpoints with their tokenizers, templates
    and preprocessor configs), loaded by path like `tiny_models`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_vlms", Path(__file__).parent / "integration" / "tiny_vlms.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
