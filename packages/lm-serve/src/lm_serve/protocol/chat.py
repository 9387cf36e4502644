"""`POST /v1/chat/completions` request."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lm_serve.protocol.common import ChatTool, NamedToolChoice, OpenAIModel, ResponseFormat, SamplingFields


class ChatMessage(OpenAIModel):
    """One message; lm-core's `validate_messages` checks the conversation as a whole (order, tool call ids)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message as a plain dict without its unset (None) fields."""
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(SamplingFields):
    """The body of `POST /v1/chat/completions`."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's extension: per prompt token, its log-probability and the top N (not with stream).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted and ignored, as other servers do: we return no audio, store nothing and have one service tier.
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
