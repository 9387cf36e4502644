"""Finding engines: the `lm_deploy.engines` entry points plus engines registered at run time."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from lm_core.engine import Engine
from lm_core.errors import LMDeployError

ENTRY_POINT_GROUP = "lm_deploy.engines"
# Other names users type for an engine: LMDeploy calls its PyTorch engine "pytorch".
BACKEND_ALIASES = {"pytorch": "torch"}
# Engines that exist as packages but cannot serve `generate` yet: asking for one is a clear error, not a lookup miss.
NOT_YET_GENERATING = {
    "turbomind": "the turbomind engine (lm-turbomind) cannot generate yet: it builds its C++ core and CPU reference "
    "kernels only; use --backend torch (or auto)",
}
_registered: dict[str, type[Engine]] = {}


def register_engine(name: str, engine_class: type[Engine]) -> None:
    """Make `engine_class` selectable as `backend=name` in this process (it shadows an installed one)."""
    if not _is_engine_class(engine_class):
        raise TypeError(f"{engine_class!r} is no subclass of lm_core.engine.Engine")
    _registered[name] = engine_class


def unregister_engine(name: str) -> None:
    """Drop the engine `register_engine` made selectable as `name` (nothing if there is none)."""
    _registered.pop(name, None)


def available_engines() -> list[str]:
    """Names usable as `backend`: registered engines and installed ones."""
    return sorted(set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def canonical_backend(name: str) -> str:
    """`name` with aliases resolved (`pytorch` -> `torch`), or a ValueError naming the engines there are.

    Cheap (entry-point metadata only, no engine import), so commands check `--backend` before loading a model.
    """
    if not _is_nonblank_str(name):
        raise ValueError(f"backend must be an engine name or 'auto', got {name!r}")
    name = name.strip()
    name = BACKEND_ALIASES.get(name.lower(), name)
    if name == "auto" or name in available_engines():
        return name
    if name.lower() in NOT_YET_GENERATING:
        raise ValueError(NOT_YET_GENERATING[name.lower()])
    installed = ", ".join(available_engines()) or "none"
    raise ValueError(f"unknown backend {name!r} (installed engines: {installed}; 'auto' picks one)")


def get_engine_class(name: str) -> type[Engine]:
    """The engine class for `backend=name` (an alias such as `pytorch` works too), importing its package only now."""
    name = canonical_backend(name)
    if name == "auto":
        raise ValueError("'auto' names no engine: select_engine picks one for a model")
    if name in _registered:
        return _registered[name]
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    engine_class = matches[0].load()
    if not (isinstance(engine_class, type) and issubclass(engine_class, Engine)):
        raise LMDeployError(f"entry point {name!r} of {ENTRY_POINT_GROUP} is no lm_core Engine: {engine_class!r}")
    return engine_class


def select_engine(backend: str, model_path: str | os.PathLike[str]) -> type[Engine]:
    """`backend` itself, or for "auto" the highest-priority installed engine that supports the model."""
    backend = canonical_backend(backend)
    if backend != "auto":
        return get_engine_class(backend)
    names = available_engines()
    if not names:
        raise LMDeployError("no inference engine is installed: pip install lm-torch (or the whole lm-deploy)")
    candidates = sorted((get_engine_class(name) for name in names), key=lambda cls: -cls.priority)
    for engine_class in candidates:
        if engine_class.supports(model_path):
            return engine_class
    raise LMDeployError(f"none of the installed engines ({', '.join(names)}) supports the model at {model_path}")


def _is_engine_class(value: object) -> bool:
    """Whether `value` is a subclass of `Engine` (callers need not be type-checked)."""
    return isinstance(value, type) and issubclass(value, Engine)


def _is_nonblank_str(value: object) -> bool:
    """Whether `value` is a string with something besides whitespace (callers need not be type-checked)."""
    return isinstance(value, str) and bool(value.strip())
