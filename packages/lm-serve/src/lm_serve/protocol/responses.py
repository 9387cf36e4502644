"""`POST /v1/responses` request (OpenAI's Responses API: text and function tools)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lm_serve.protocol.common import OpenAIModel


class ResponseFunctionTool(OpenAIModel):
    """A function tool of a Responses request (flat: name and parameters at the top level)."""

    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseNamedToolChoice(OpenAIModel):
    """`tool_choice` naming one function the model must call."""

    type: Literal["function"] = "function"
    name: str


class ResponseTextFormat(OpenAIModel):
    """`text.format`: `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "schema": ...}`."""

    type: Literal["text", "json_object", "json_schema", "regex"] = "text"
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None
    regex: str | None = None


class ResponseTextConfig(OpenAIModel):
    """`text`: the output format of a Responses request."""

    format: ResponseTextFormat | None = None


class ResponsesRequest(OpenAIModel):
    """The body of `POST /v1/responses`."""

    model: str
    # A string (one user message) or a list of input items: messages, function calls and their outputs.
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponseFunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    text: ResponseTextConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Extensions, as on chat completions.
    seed: int | None = None
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
