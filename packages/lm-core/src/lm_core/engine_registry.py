"""Finding engines: the `lm_deploy.engines` entry points plus engines registered at run time."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from lm_core.engine import Engine
from lm_core.errors import LMDeployError

ENTRY_POINT_GROUP = "lm_deploy.engines"
_registered: dict[str, type[Engine]] = {}


def register_engine(name: str, engine_class: type[Engine]) -> None:
    """Make `engine_class` selectable as `backend=name` in this process (it shadows an installed one)."""
    if not (isinstance(engine_class, type) and issubclass(engine_class, Engine)):
        raise TypeError(f"{engine_class!r} is no subclass of lm_core.engine.Engine")
    _registered[name] = engine_class


def unregister_engine(name: str) -> None:
    _registered.pop(name, None)


def available_engines() -> list[str]:
    """Names usable as `backend`: registered engines and installed ones."""
    return sorted(set(_registered) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_engine_class(name: str) -> type[Engine]:
    """The engine class for `backend=name`, importing its package only now."""
    if name in _registered:
        return _registered[name]
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        installed = ", ".join(available_engines()) or "none"
        raise ValueError(f"unknown backend {name!r} (installed engines: {installed}; 'auto' picks one)")
    engine_class = matches[0].load()
    if not (isinstance(engine_class, type) and issubclass(engine_class, Engine)):
        raise LMDeployError(f"entry point {name!r} of {ENTRY_POINT_GROUP} is no lm_core Engine: {engine_class!r}")
    return engine_class


def select_engine(backend: str, model_path: str | os.PathLike[str]) -> type[Engine]:
    """`backend` itself, or for "auto" the highest-priority installed engine that supports the model."""
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
