"""Environment variables are read once, into `KernelConfig` (`lm_torch.envs`); kernel, layer, runner and graph code
never reads `os.environ` (`os.getenv`) itself."""

from __future__ import annotations

from pathlib import Path

import pytest

import lm_torch

PACKAGE = Path(lm_torch.__file__).parent
READS = ("os.environ", "os.getenv", "getenv(")


def _readers(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(read in line for read in READS):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    return found


def test_kernels_layers_and_runner_read_no_environment():
    folders = [PACKAGE / name for name in ("kernels", "layers", "runner")]
    assert all(folder.is_dir() for folder in folders)
    files = [path for folder in folders for path in sorted(folder.rglob("*.py"))]
    assert len(files) > 20 and any(path.parent.name == "runner" for path in files)
    assert _readers(files) == []


def test_the_attention_backends_and_the_engine_read_no_environment():
    files = [*sorted((PACKAGE / "attention").glob("*.py")), PACKAGE / "engine.py", PACKAGE / "scheduler.py"]
    assert _readers(files) == []


def test_kernel_config_reads_the_variables_once(monkeypatch):
    from lm_torch.config import KernelConfig, TorchEngineConfig
    from lm_torch.envs import DecodeSplits

    monkeypatch.setenv("LM_TORCH_PDL", "0")
    monkeypatch.setenv("LM_TORCH_DECODE_SPLITS", "4:128")
    monkeypatch.setenv("LM_TORCH_GEMM_TUNING", "none")
    config = TorchEngineConfig(session_len=64)
    assert config.kernels == KernelConfig(pdl=False, gemm_tuning="none", decode_splits=DecodeSplits(4, 128))
    monkeypatch.setenv("LM_TORCH_PDL", "1")
    assert config.kernels.pdl is False  # read when the config was made, not later
    # An explicit field wins over the variable; an explicit KernelConfig is taken as it is.
    assert TorchEngineConfig(pdl=False).kernels.gemm_tuning == "none"
    assert TorchEngineConfig(gemm_tuning="/x.json").kernels.gemm_tuning == "/x.json"
    assert TorchEngineConfig(kernels=KernelConfig()).kernels == KernelConfig()
    monkeypatch.setenv("LM_TORCH_DECODE_SPLITS", "4")
    with pytest.raises(ValueError, match=r"LM_TORCH_DECODE_SPLITS.*decode_splits must be 'S:T'"):
        TorchEngineConfig()
