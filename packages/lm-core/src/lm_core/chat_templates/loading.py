"""Finding chat templates: a model directory's own, a .jinja/.json file, or a built-in (see `lm_core.chat_template`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, cast

from lm_core.chat_templates.template import SPECIAL_TOKEN_NAMES, ChatTemplate, ChatTemplateError

BUILTIN_TEMPLATES: tuple[str, ...] = ("base", "chatml", "llama2", "llama3", "vicuna")

# The special tokens each built-in format is defined with; a model directory's own tokens replace them.
_BUILTIN_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "base": {},
    "chatml": {"eos_token": "<|im_end|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "vicuna": {"bos_token": "<s>", "eos_token": "</s>"},
}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores a token as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content: Any = cast(Mapping[str, Any], value).get("content")
        if isinstance(content, str):
            return content
    return None


def _special_tokens_from(config: Mapping[str, Any]) -> dict[str, str]:
    found = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: token for name, token in found.items() if token is not None}


def _json_object(value: Any) -> Mapping[str, Any] | None:
    # A JSON document's top level as a mapping, or None when it is not an object.
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from e


def _split_named(value: Any, where: str) -> tuple[str, dict[str, str]]:
    """(default template, other named templates) from a "chat_template" entry: a string, or [{"name", "template"}]."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, list):
        named: dict[str, str] = {}
        item: Any
        for i, item in enumerate(cast(list[Any], value)):
            entry = _json_object(item)
            if not (entry is not None and isinstance(entry.get("name"), str)):
                raise ChatTemplateError(f"{where}: chat_template[{i}] is not a {{'name': ..., 'template': ...}} entry")
            if not isinstance(entry.get("template"), str):
                raise ChatTemplateError(f"{where}: chat_template[{i}] ({entry['name']!r}) has no template text")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise ChatTemplateError(f"{where}: none of the named chat templates is 'default' ({', '.join(named)})")
        return named.pop("default"), named
    raise ChatTemplateError(f"{where}: 'chat_template' must be a string or a list of named templates")


def _model_special_tokens(model_dir: Path) -> dict[str, str]:
    tokens: dict[str, str] = {}
    # special_tokens_map.json fills what tokenizer_config.json leaves out, as transformers does.
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        path = model_dir / filename
        if path.is_file():
            config = _json_object(_read_json(path))
            if config is not None:
                tokens.update(_special_tokens_from(config))
    return tokens


def _model_template(model_dir: Path) -> ChatTemplate | None:
    tokens = _model_special_tokens(model_dir)
    variants: dict[str, str] = {}
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        variants = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))}
    # The standalone files win over tokenizer_config.json, as in transformers (newer saves write the template there).
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
        return ChatTemplate(source, f"{model_dir.name}/{jinja_file.name}", special_tokens=tokens, variants=variants)
    for filename in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / filename
        config = _json_object(_read_json(path)) if path.is_file() else None
        if config is not None and config.get("chat_template") is not None:
            source, named = _split_named(config["chat_template"], str(path))
            name = f"{model_dir.name}/{filename}"
            return ChatTemplate(source, name, special_tokens=tokens, variants={**variants, **named})
    return None


def _file_template(path: Path, model_dir: Path | None) -> ChatTemplate:
    tokens = _model_special_tokens(model_dir) if model_dir is not None else {}
    if not path.is_file():
        raise ChatTemplateError(f"chat template file not found: {path}")
    if path.suffix == ".jinja":
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), path.name, special_tokens=tokens)
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read {path}: {e}") from e
    config = _json_object(_read_json(path))
    if config is None or config.get("chat_template") is None:
        raise ChatTemplateError(f"{path} has no 'chat_template' entry")
    source, named = _split_named(config["chat_template"], str(path))
    # A tokenizer_config.json brings its own special tokens.
    return ChatTemplate(source, path.name, special_tokens={**tokens, **_special_tokens_from(config)}, variants=named)


def builtin_template(name: str) -> ChatTemplate:
    """The built-in template `name` (one of `BUILTIN_TEMPLATES`) with its format's default special tokens."""
    if name not in BUILTIN_TEMPLATES:
        raise ChatTemplateError(f"no built-in chat template {name!r}: pass one of {', '.join(BUILTIN_TEMPLATES)}")
    source = resources.files("lm_core").joinpath("templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")
    return ChatTemplate(source, name, special_tokens=_BUILTIN_SPECIAL_TOKENS[name])


def load_chat_template(
    spec: str | os.PathLike[str] | None = None, model_dir: str | os.PathLike[str] | None = None
) -> ChatTemplate | None:
    """The chat template `spec` names, or the model's own when `spec` is None.

    `spec`: None (the model's template: ``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``
    in `model_dir`; None if it has none), a built-in name (`BUILTIN_TEMPLATES`), or a path to a ``.jinja`` file or a
    ``.json`` file with a "chat_template" entry (such as a tokenizer_config.json). Special tokens come from
    `model_dir` when given (and from the .json file, if it has them).
    """
    model_path = Path(model_dir) if model_dir is not None else None
    if model_path is not None and not model_path.is_dir():
        raise ChatTemplateError(f"model directory not found: {model_path}")
    if spec is None:
        return _model_template(model_path) if model_path is not None else None
    if isinstance(spec, str) and spec in BUILTIN_TEMPLATES:
        template = builtin_template(spec)
        if model_path is not None:
            template.special_tokens.update(_model_special_tokens(model_path))
        return template
    path = Path(spec)
    if path.suffix in (".jinja", ".json"):
        return _file_template(path, model_path)
    raise ChatTemplateError(
        f"unknown chat template {os.fspath(spec)!r}: pass one of {', '.join(BUILTIN_TEMPLATES)} "
        "or a path to a .jinja/.json file"
    )
