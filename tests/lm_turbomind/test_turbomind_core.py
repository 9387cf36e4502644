"""The compiled extension imports and reports a consistent version and CUDA state."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import lm_turbomind

PYPROJECT = Path(__file__).resolve().parents[2] / "packages" / "lm-turbomind" / "pyproject.toml"


def test_version_matches_python_package() -> None:
    assert lm_turbomind.version() == lm_turbomind.__version__


def test_version_matches_pyproject_and_installed_metadata() -> None:
    tomllib = pytest.importorskip("tomllib")  # stdlib from 3.11 on
    declared = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"]
    assert lm_turbomind.__version__ == declared
    try:
        installed = importlib.metadata.version("lm-turbomind")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lm-turbomind is importable but not installed as a distribution")
    assert installed == declared


def test_build_info_shape() -> None:
    info = lm_turbomind.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_arch"], str)
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["cxx_standard"] >= 17
    # A CUDA build must say which architectures it carries; a CPU build must not pretend to have any.
    assert bool(info["cuda_arch"]) == info["cuda"]
    assert "native" not in info["cuda_arch"]


def test_has_cuda_is_false_without_cuda_build() -> None:
    result = lm_turbomind.has_cuda()
    assert isinstance(result, bool)
    if not lm_turbomind.build_info()["cuda"]:
        assert result is False


def test_has_cuda_agrees_with_torch_on_cpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU; covered by test_has_cuda_on_gpu")
    assert lm_turbomind.has_cuda() is False


@pytest.mark.gpu
def test_has_cuda_on_gpu() -> None:
    if not lm_turbomind.build_info()["cuda"]:
        pytest.skip("lm_turbomind was built without CUDA (LM_TURBOMIND_CUDA=OFF)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    assert lm_turbomind.has_cuda() is True
