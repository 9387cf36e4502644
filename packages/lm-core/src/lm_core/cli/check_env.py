"""`lm check_env`: the versions and devices a bug report needs."""

from __future__ import annotations

import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import click

LM_DISTRIBUTIONS = ("lm-deploy", "lm-core", "lm-torch", "lm-turbomind", "lm-lite", "lm-vl", "lm-serve")
THIRD_PARTY = ("torch", "triton", "transformers", "tokenizers", "safetensors", "gguf", "numpy")


def _dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _devices() -> list[tuple[str, str]]:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return [("CUDA", "unknown (torch not installed)")]
    rows = [("CUDA available", str(torch.cuda.is_available())), ("CUDA (torch build)", str(torch.version.cuda))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append(
                (f"GPU {i}", f"{props.name}, {props.total_memory / 1024**3:.1f} GiB, sm_{props.major}{props.minor}")
            )
    else:
        rows.append(("CPU threads", str(torch.get_num_threads())))
    return rows


@click.command("check_env")
def check_env() -> None:
    """Print Python, torch, triton, transformers, CUDA/GPU and every lm package's version."""
    rows = [("Python", sys.version.split()[0]), ("Platform", platform.platform())]
    rows += [(name, _dist_version(name)) for name in THIRD_PARTY]
    rows += _devices()
    rows += [(name, _dist_version(name)) for name in LM_DISTRIBUTIONS]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
