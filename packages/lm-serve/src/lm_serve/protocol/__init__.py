"""Pydantic models of the server's requests (responses are built as plain dicts in OpenAI's exact shapes)."""

from lm_serve.protocol.chat import ChatCompletionRequest, ChatMessage
from lm_serve.protocol.common import (
    ChatTool,
    FunctionDefinition,
    NamedToolChoice,
    OpenAIModel,
    ResponseFormat,
    SamplingFields,
    StreamOptions,
)
from lm_serve.protocol.completions import CompletionRequest
from lm_serve.protocol.misc import DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from lm_serve.protocol.responses import ResponsesRequest

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatTool",
    "CompletionRequest",
    "DetokenizeRequest",
    "EmbeddingRequest",
    "FunctionDefinition",
    "NamedToolChoice",
    "OpenAIModel",
    "ResponseFormat",
    "ResponsesRequest",
    "SamplingFields",
    "StreamOptions",
    "TokenizeRequest",
]
