"""The Jinja environment chat templates run in, and what we learn about a template from its syntax tree.

Templates come from model repositories, so they are untrusted code: they run in an immutable sandbox, see only plain
data (`template_data`), and get the globals that Hugging Face-style templates use (`raise_exception`, `strftime_now`,
`namespace`, `dict`) and a `tojson` filter that writes JSON the way Python's `json.dumps` does (no HTML escaping, the
characters kept as they are, keys in their order, optional indent), since that is what the models were trained on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn, cast

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from lm_core.messages import ToolCallArguments


class TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(message)` in a template raises: the template's own verdict on its input."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _refuse_private(name: object) -> None:
    # Underscore names lead to interpreter internals; the sandbox guards attribute reads, this guards namespace writes.
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")


class _GuardedNamespace(Namespace):
    def __setitem__(self, name: str, value: Any) -> None:
        _refuse_private(name)
        super().__setitem__(name, value)


def _namespace(*args: Any, **kwargs: Any) -> Namespace:
    attrs = dict(*args, **kwargs)
    for name in attrs:
        _refuse_private(name)
    return _GuardedNamespace(attrs)


def _dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


# Templates call dict(...) and dict.fromkeys(...); a function keeps them away from the type object itself.
_dict.fromkeys = dict.fromkeys  # type: ignore[attr-defined]


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``: training templates mark assistant text with it; we just render it."""

    tags = {"generation"}  # noqa: RUF012 (Jinja's Extension declares it as a class attribute)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock], autoescape=False
    )
    env.filters["tojson"] = _tojson  # pyright: ignore[reportUnknownMemberType] (jinja2: filters' values untyped)
    env.globals.update(  # pyright: ignore[reportUnknownMemberType] (jinja2: globals' values untyped)
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_namespace, dict=_dict
    )
    return env


ENVIRONMENT = _make_environment()


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template for `source` (cached: servers render the same template for every request)."""
    return ENVIRONMENT.from_string(source)


def _content_expr(node: nodes.Node | None) -> bool:
    """Whether `node` is ``x.content`` or ``x['content']``, possibly through filters."""
    while isinstance(node, nodes.Filter):
        node = node.node
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return False


@lru_cache(maxsize=64)
def iterates_content_parts(source: str) -> bool:
    """Whether the template loops over a message's content, i.e. expects content as a list of parts.

    True for ``{% for part in message['content'] %}`` and for loops over a variable set to a message's content.
    """
    tree = ENVIRONMENT.parse(source)
    content_vars = {
        node.target.name
        for node in tree.find_all(nodes.Assign)
        if isinstance(node.target, nodes.Name) and _content_expr(node.node)
    }
    for loop in tree.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter):
            it = it.node
        if _content_expr(it) or (isinstance(it, nodes.Name) and it.name in content_vars):
            return True
    return False


def template_data(value: Any) -> Any:
    """`value` rebuilt from plain JSON-like types, the only kind of data a template sees.

    Rich objects (images, arrays...) have methods the sandbox cannot judge, so they become a placeholder naming their
    type, e.g. "<Image>"; templates only test whether such keys are present.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, ToolCallArguments):
        return ToolCallArguments({key: template_data(item) for key, item in value.items()}, str(value))
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {template_data(key): template_data(item) for key, item in cast(Mapping[Any, Any], value).items()}
    if isinstance(value, list):
        return [template_data(item) for item in cast(list[Any], value)]
    if isinstance(value, tuple):
        return tuple(template_data(item) for item in cast(tuple[Any, ...], value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: template_data(getattr(value, field.name)) for field in dataclasses.fields(value)}
    item: Any = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return template_data(item())  # numpy scalars
    return f"<{type(value).__name__}>"
