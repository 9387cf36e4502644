"""`ChatTemplate`: a Jinja chat template and how it renders OpenAI-style messages (see `lm_core.chat_template`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jinja2

from lm_core.chat_templates.jinja import TemplateRaised, compile_template, iterates_content_parts, template_data
from lm_core.errors import LMDeployError
from lm_core.messages import validate_messages

# The named special tokens transformers passes to templates (tokenizer.special_tokens_map).
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(LMDeployError, ValueError):
    """A chat template that cannot be found, loaded or rendered for the given input; the message says why."""


class ChatTemplate:
    """A Jinja chat template with the special tokens it is rendered with.

    ``name`` says where it comes from (a built-in name, a file name, or ``<model dir>/<file>``); ``source`` is the
    Jinja text; ``special_tokens`` (``bos_token``, ``eos_token``, ...) are template variables; ``variants`` holds the
    model's other named templates (e.g. "tool_use", "rag").
    """

    def __init__(
        self,
        source: str,
        name: str = "custom",
        *,
        special_tokens: Mapping[str, str] | None = None,
        variants: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(cast(object, source), str):
            raise ChatTemplateError(f"chat template {name!r}: expected Jinja text, got {type(source).__name__}")
        self.name = name
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.variants = dict(variants or {})
        for variant_name, text in [(name, source), *((f"{name}:{k}", v) for k, v in self.variants.items())]:
            try:
                compile_template(text)
            except jinja2.TemplateSyntaxError as e:
                message = f"chat template {variant_name!r} is not valid Jinja: {e} (line {e.lineno})"
                raise ChatTemplateError(message) from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    def variant(self, name: str) -> ChatTemplate:
        """The model's template called `name` (e.g. "rag"), with the same special tokens."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "none"
            raise ChatTemplateError(f"chat template {self.name!r} has no variant {name!r} (variants: {known})")
        return ChatTemplate(self.variants[name], f"{self.name}:{name}", special_tokens=self.special_tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, str] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts), ending with the assistant's header if asked.

        `tools` are JSON schemas (``{"type": "function", "function": {...}}``), `documents` dicts (e.g. ``title`` and
        ``text``) for retrieval templates; `special_tokens` override the template's own; `template_kwargs` become
        template variables (``enable_thinking=False``, ``date_string=...``). Raises ValueError for invalid messages,
        tools or documents, and `ChatTemplateError` when the template rejects the conversation (its message says why).
        """
        source, name = self.source, self.name
        if tools is not None and "tool_use" in self.variants:
            source, name = self.variants["tool_use"], f"{self.name}:tool_use"
        messages = [self._prepare(message, source) for message in validate_messages(messages)]
        context: dict[str, Any] = {
            **self.special_tokens,
            **(special_tokens or {}),
            **template_data(template_kwargs),
            "messages": messages,
            "tools": template_data(_check_dicts("tools", tools)),
            "documents": template_data(_check_dicts("documents", documents)),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return compile_template(source).render(context)
        except TemplateRaised as e:
            raise ChatTemplateError(f"chat template {name!r} rejected the conversation: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {name!r} failed: {type(e).__name__}: {e}") from e
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
            # Templates assume things about their input (e.g. string content) and fail in Python when it differs.
            raise ChatTemplateError(f"chat template {name!r} cannot render this input: {type(e).__name__}: {e}") from e

    @staticmethod
    def _prepare(message: dict[str, Any], source: str) -> dict[str, Any]:
        content: Any = message.get("content")
        if isinstance(content, list):
            parts = cast(list[Any], content)
            if all(part["type"] == "text" for part in parts) and not iterates_content_parts(source):
                message["content"] = "\n".join(part["text"] for part in parts)
        if message["role"] == "developer" and "developer" not in source:
            message["role"] = "system"
        reasoning = next((message[key] for key in _REASONING_KEYS if message.get(key) is not None), None)
        if reasoning is not None:
            # Same order as transformers builds it, for templates that iterate over a message's keys.
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        return template_data(message)


def _check_dicts(what: str, items: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]] | None:
    if items is None:
        return None
    # Callers pass JSON from requests: the annotation is checked here, not trusted.
    given = cast(object, items)
    if isinstance(given, str | bytes | Mapping) or not isinstance(given, Sequence):
        raise ValueError(f"{what}: expected a list of dicts, got {type(items).__name__}")
    for i, item in enumerate(cast(Sequence[object], items)):
        if not isinstance(item, Mapping):
            hint = " (a JSON schema like {'type': 'function', 'function': {...}})" if what == "tools" else ""
            raise ValueError(f"{what}[{i}]: expected a dict{hint}, got {type(item).__name__}")
    return list(items)
