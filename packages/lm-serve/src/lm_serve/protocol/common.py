"""Request pieces shared by the OpenAI endpoints: the base model, sampling fields, tools, response formats.

Models accept what OpenAI's API accepts: unknown fields are ignored (clients send many we do not use), and the
bounds here are OpenAI's, so out-of-range values get a 400 before anything reaches the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIModel(BaseModel):
    """Base of request models: extra fields are ignored, not rejected."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(OpenAIModel):
    """`stream_options`: whether streamed chunks carry token usage (the last one, or every one)."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class FunctionDefinition(OpenAIModel):
    """A function the model may call: its name, description and JSON schema of parameters."""

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    """A tool of a chat request (OpenAI has only function tools)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    """The function a named `tool_choice` forces."""

    name: str


class NamedToolChoice(OpenAIModel):
    """`tool_choice` naming one function the model must call."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaSpec(OpenAIModel):
    """`response_format.json_schema`: the schema the output must follow, and its name."""

    name: str | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """`text`, `json_object`, `json_schema` (OpenAI's), or `regex` (ours: `{"type": "regex", "regex": ...}`)."""

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: JSONSchemaSpec | None = None
    regex: str | None = None

    def to_engine(self) -> dict[str, Any] | None:
        """The form `GenerationConfig.response_format` takes (None for plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.type == "regex":
            return {"type": "regex", "regex": self.regex}
        spec = self.json_schema
        schema = spec.json_schema if spec is not None else None
        return {"type": "json_schema", "json_schema": {"name": spec.name if spec else None, "schema": schema}}


class SamplingFields(OpenAIModel):
    """Decoding parameters shared by chat and text completions (OpenAI's, plus vLLM/LMDeploy extensions)."""

    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM and LMDeploy spell them so).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
