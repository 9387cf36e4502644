"""Asking for CUDA without a CUDA compiler must stop the build, never fall back to a CPU-only module."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "packages" / "lm-turbomind"

# Directories holding these stay on PATH even if nvcc sits next to them (e.g. /usr/bin), or the build could not start.
BUILD_TOOLS = ("cmake", "ninja", "make", "c++", "g++", "cc", "gcc")


def _env_without_nvcc(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDAHOSTCXX")}
    nowhere = str(tmp_path / "no-cuda")
    for var in ("CUDA_PATH", "CUDA_HOME", "CUDA_ROOT", "CUDAToolkit_ROOT"):
        env[var] = nowhere

    def hides_nvcc_safely(entry: str) -> bool:
        folder = Path(entry)
        return (folder / "nvcc").exists() and not any((folder / tool).exists() for tool in BUILD_TOOLS)

    env["PATH"] = os.pathsep.join(e for e in env.get("PATH", "").split(os.pathsep) if e and not hides_nvcc_safely(e))
    if shutil.which("nvcc", path=env["PATH"]):
        # nvcc shares a folder with the build tools; a CUDACXX that does not exist fails CMake's search the same way.
        env["CUDACXX"] = str(Path(nowhere) / "nvcc")
    env["LM_TURBOMIND_CUDA"] = "ON"
    return env


@pytest.mark.slow
def test_cuda_on_without_nvcc_fails_loudly(tmp_path: Path) -> None:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment")
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "dist")]
    # A fresh build dir keeps a CMake cache from an earlier CUDA build from supplying a compiler.
    cmd += ["-C", f"build-dir={tmp_path / 'build'}"]
    if importlib.util.find_spec("scikit_build_core") and importlib.util.find_spec("pybind11"):
        cmd.append("--no-build-isolation")
    cmd.append(str(PACKAGE_DIR))

    proc = subprocess.run(
        cmd, env=_env_without_nvcc(tmp_path), capture_output=True, text=True, timeout=600, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"build with LM_TURBOMIND_CUDA=ON and no nvcc succeeded:\n{output[-4000:]}"
    # CMake wraps long messages; compare with runs of whitespace collapsed.
    flat = " ".join(output.split())
    assert "CMake Error" in flat, output[-4000:]
    assert "LM_TURBOMIND_CUDA=ON" in flat, output[-4000:]
    assert "nvcc" in flat, output[-4000:]
    assert not list((tmp_path / "dist").glob("*.whl"))
