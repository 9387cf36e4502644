"""The `LM_TORCH_*` environment variables: one typed registry, read once into `KernelConfig` at engine start.

Nothing else in lm-torch reads these variables: `KernelConfig.from_env()` calls `read_all()` when an engine config is
made, and the kernels receive the values (and the tuning tables they name) as arguments. `TRITON_INTERPRET` is
triton's own switch; `triton_interpret()` reads it once per process, since triton itself fixes the mode at import.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecodeSplits:
    """The decode kernel's split plan forced on every CUDA-graph bucket ("S:T" in `LM_TORCH_DECODE_SPLITS`).

    Buckets whose split-K comes out below `min_splits` take `min_splits`, and every split covers at least
    `min_tokens` tokens, so only sequences longer than that split.
    """

    min_splits: int
    min_tokens: int

    def __post_init__(self) -> None:
        for name in ("min_splits", "min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelConfig.decode_splits.{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> DecodeSplits:
        """'S:T' -> DecodeSplits(S, T); a ValueError naming `decode_splits` for anything else."""
        try:
            splits, tokens = (int(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"KernelConfig.decode_splits must be 'S:T' (two integers), got {text!r}") from None
        if splits < 1 or tokens < 1:
            raise ValueError(f"KernelConfig.decode_splits must be 'S:T' with S and T at least 1, got {text!r}")
        return cls(splits, tokens)


def _parse_switch(text: str) -> bool:
    """'0' is off; anything else (the variable set to 1, yes, ...) is on."""
    return text.strip() != "0"


def _parse_table(text: str) -> str:
    """A tuning-table path, or 'none' for no table."""
    return text


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: the `KernelConfig` field it sets, its parser and what it means."""

    name: str
    field: str
    parse: Callable[[str], Any]
    default: Any
    doc: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar(
        "LM_TORCH_ZERO_PADDING",
        "zero_padding",
        _parse_switch,
        True,
        "0: the padding rows of a step's inputs are left as they are instead of zeroed.",
    ),
    EnvVar(
        "LM_TORCH_PDL",
        "pdl",
        _parse_switch,
        True,
        "0: no programmatic dependent launch (sm_90+ kernels wait for the previous kernel to end).",
    ),
    EnvVar(
        "LM_TORCH_DECODE_TUNING",
        "decode_tuning",
        _parse_table,
        None,
        "The decode-attention tuning table (a JSON path, or 'none'); unset: the table shipped with the kernels.",
    ),
    EnvVar(
        "LM_TORCH_GEMM_TUNING",
        "gemm_tuning",
        _parse_table,
        None,
        "The small-batch GEMM tuning table (a JSON path, or 'none': cuBLAS everywhere); unset: the shipped one.",
    ),
    EnvVar(
        "LM_TORCH_W4A16_TUNING",
        "w4a16_tuning",
        _parse_table,
        None,
        "The W4A16 launch-shape table (a JSON path, or 'none'); unset: the shipped one.",
    ),
    EnvVar(
        "LM_TORCH_DECODE_SPLITS",
        "decode_splits",
        DecodeSplits.parse,
        None,
        "'S:T': CUDA-graph buckets take at least S decode splits of at least T tokens; unset: the tuned plan.",
    ),
)


def read_all(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `KernelConfig` fields the variables that are set give (field name -> parsed value).

    An empty value counts as unset. A value that does not parse is a ValueError naming the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var in ENV_VARS:
        text = environ.get(var.name)
        if text is None or text == "":
            continue
        try:
            values[var.field] = var.parse(text)
        except ValueError as exc:
            raise ValueError(f"{var.name}: {exc}") from None
    return values


@functools.cache
def triton_interpret() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET set and not 0), read once per process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
