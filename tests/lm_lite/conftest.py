"""Fixtures of the lm-lite tests: tiny checkpoints of each family, a short calibration file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _tiny_models():
    spec = importlib.util.spec_from_file_location("lm_lite_tiny_models", HERE / "tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_models = _tiny_models()


@pytest.fixture(scope="session")
def make_tiny(default_model_dir, tmp_path_factory):
    """make_tiny(family) -> a tiny checkpoint directory (made once per family and session)."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = tiny_models.make_tiny(family, tmp_path_factory.mktemp(family), default_model_dir)
        return made[family]

    return make


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> str:
    """20 KB of the built-in calibration text: enough for a few short samples, quick to tokenize."""
    from importlib import resources

    text = resources.files("lm_lite").joinpath("data/calib_builtin.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(text[:20000], encoding="utf-8")
    return str(path)
