"""Checking a quantization job before any long work: arguments, model, architecture, group size, data, work dir.

Everything here reads config.json and the file system only, so a mistake fails in well under a second, before the
model's weights load.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lm_lite.calib_data import check_calib_dataset
from lm_lite.families import GROUP_SIZE_CHOICES, Family, check_group_size, family_for, pick_group_size

# The folder of a work dir where `calibrate` keeps statistics that the quantizers reuse: it does not make the work
# dir "non-empty", and keeps its safetensors file away from the checkpoint's.
CALIBRATION_DIR = "calibration"
# What a previous run wrote, removed by `overwrite` so that no stale shard is loaded with the new ones.
_STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "config.json", "quant_config.json")
_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class CalibOptions:
    """Calibration data and how the layer walk runs (shared by every calibrating command)."""

    calib_dataset: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 2048
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("calib_samples", "calib_seqlen", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.device not in _DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(_DEVICES)} or cuda:N, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        check_calib_dataset(self.calib_dataset)


@dataclass
class Job:
    """A resolved job: the model directory, its config and family, and a checked work dir."""

    model_dir: Path
    config: dict
    family: Family
    work_dir: Path
    group_size: int | None = None  # the checked group size of a grouped quantizer (picked when not given)

    @property
    def grouped_size(self) -> int:
        """`group_size` of a grouped job (`prepare_job(grouped=True)` always sets it)."""
        if self.group_size is None:
            raise ValueError("group_size: this job was prepared without groups")
        return self.group_size


def check_bits(w_bits: int, allowed: tuple[int, ...], method: str) -> None:
    """A ValueError naming w_bits unless it is one of `allowed` for `method`."""
    if isinstance(w_bits, bool) or w_bits not in allowed:
        raise ValueError(f"w_bits must be one of {', '.join(map(str, allowed))} for {method}, got {w_bits!r}")


def check_group(w_group_size: int | None) -> None:
    """A ValueError unless `w_group_size` is a positive integer, -1 (one group per row) or None (picked per model)."""
    if w_group_size is None:
        return
    if isinstance(w_group_size, bool) or not isinstance(w_group_size, int) or (w_group_size < 1 and w_group_size != -1):
        raise ValueError(f"w_group_size must be a positive integer or -1 (one group per row), got {w_group_size!r}")


def prepare_job(
    model: str | os.PathLike | None,
    work_dir: str | os.PathLike,
    overwrite: bool,
    group_size: int | None = None,
    pack_axis: str | None = None,
    pack_factor: int = 8,
    grouped: bool = False,
) -> Job:
    """Resolve the model and check everything that can be checked without loading it; prepare the work dir.

    A `grouped` quantizer without a `group_size` gets the largest of `GROUP_SIZE_CHOICES` that fits the model.
    """
    from lm_core import resolve_model
    from lm_lite.families import architecture, read_config

    model_dir = resolve_model(None if model is None else str(model))
    config = read_config(model_dir)
    family = family_for(architecture(config))
    if grouped and group_size is None:
        group_size = pick_group_size(config, family)
        choices = ", ".join(map(str, GROUP_SIZE_CHOICES))
        print(f"lm-lite: w_group_size {group_size} (the largest of {choices} that fits this model)", file=sys.stderr)
    if group_size is not None:
        check_group_size(config, family, group_size, pack_axis, pack_factor)
    out = check_work_dir(work_dir, overwrite, model_dir)
    return Job(model_dir=model_dir, config=config, family=family, work_dir=out, group_size=group_size)


def check_work_dir(work_dir: str | os.PathLike, overwrite: bool, model_dir: Path | None = None) -> Path:
    """The work dir, created if missing. A non-empty one needs `overwrite`, which removes a previous run's weights."""
    if work_dir is None or not str(work_dir).strip():
        raise ValueError("work_dir is empty")
    path = Path(work_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"work_dir {str(path)!r} exists and is not a directory")
    if model_dir is not None and path == Path(model_dir).resolve():
        raise ValueError(f"work_dir {str(path)!r} is the model's own directory; choose another")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name != CALIBRATION_DIR)
        if others and not overwrite:
            shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
            raise ValueError(
                f"work_dir {str(path)!r} is not empty ({shown}); pass overwrite=True (--overwrite) to write over it"
            )
        if overwrite:
            for pattern in _STALE_PATTERNS:
                for stale in path.glob(pattern):
                    if stale.is_file():
                        stale.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path
