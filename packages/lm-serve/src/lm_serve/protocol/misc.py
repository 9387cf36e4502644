"""Requests of the smaller endpoints: embeddings, tokenize, detokenize."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lm_serve.protocol.chat import ChatMessage
from lm_serve.protocol.common import ChatTool, OpenAIModel


class EmbeddingRequest(OpenAIModel):
    """The body of `POST /v1/embeddings`."""

    model: str
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # Extension: how the hidden states of the last layer become one vector.
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = True


class TokenizeRequest(OpenAIModel):
    """Either `prompt` (plain text) or `messages` (rendered with the chat template first)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    """The body of `POST /detokenize`: token ids to turn back into text."""

    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = False
