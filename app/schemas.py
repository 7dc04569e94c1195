"""OpenAI request bodies the API accepts, with the limits OpenAI documents.

Responses are built from the `openai` package's own types (see serving_*.py). Unknown fields are
ignored, as OpenAI-compatible servers do; fields we know but do not support yet are rejected with a
clear 400 in `reject_unsupported`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidRequest, Unsupported


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="the id /v1/models lists")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=128, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings; never emitted")
    seed: int | None = Field(None, description="same seed, same output")
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    ignore_eos: bool | None = Field(False, description="vLLM extension: keep generating past EOS (benchmarks)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_or_none(self) -> dict | None:
        """The JSON schema the output must follow (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is None:
            raise InvalidRequest("response_format of type 'json_schema' needs a 'json_schema' object.", param="response_format")
        return self.json_schema.schema_ or {"type": "object"}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a token array or a list of token arrays"
    )
    max_tokens: int | None = Field(16, ge=0, description="OpenAI's default is 16; null: up to the context")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = Field(None, description="extension (as vLLM and llama-server): JSON output")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = ""


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallIn | None = None  # legacy assistant message

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content or [])


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="deprecated by OpenAI; same as max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, description="deprecated by OpenAI: tools")
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(None, description="deprecated: tool_choice")
    response_format: ResponseFormat | None = None

    def legacy_functions(self) -> bool:
        """The request uses the deprecated functions / function_call fields (the reply does too)."""
        return bool(self.functions) and not self.tools

    def tool_mode(self) -> tuple[list[FunctionDefinition], str]:
        """The functions the model may call and how: 'none', 'auto', 'required' or a function name."""
        if self.legacy_functions():
            functions, choice = self.functions, self.function_call
        else:
            functions, choice = [t.function for t in self.tools or []], self.tool_choice
        if not functions:
            return [], "none"
        if choice is None:
            return functions, "auto"
        if isinstance(choice, str):
            return functions, choice
        inner = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        return functions, inner


def reject_unsupported(req: SamplingFields) -> None:
    """Raise a 400 naming the first field we accept in the schema but cannot honour yet."""
    if len(req.stop_list()) > 16:
        raise InvalidRequest("At most 16 stop sequences are supported.", param="stop")
    for key, bias in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise InvalidRequest(f"logit_bias keys must be token ids, got '{key}'.", param="logit_bias")
        if not -100 <= bias <= 100:
            raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias}.", param="logit_bias")
    if req.response_format is not None:
        schema = req.response_format.schema_or_none()
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequest("The JSON schema must be an object.", param="response_format")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise Unsupported("'suffix' (insertion) is not supported yet.", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise Unsupported("'best_of' other than n is not supported yet.", param="best_of")
    if isinstance(req, ChatCompletionRequest):
        _check_tools(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        for i, m in enumerate(req.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise InvalidRequest("A message with role 'tool' needs 'tool_call_id'.", param=f"messages[{i}].tool_call_id")
            if m.role == "function" and not m.name:
                raise InvalidRequest("A message with role 'function' needs 'name'.", param=f"messages[{i}].name")
            for part in m.content if isinstance(m.content, list) else []:
                if part.type != "text" or part.text is None:
                    raise Unsupported(
                        f"Content parts of type '{part.type}' are not supported; only 'text'.",
                        param=f"messages[{i}].content",
                    )


def _check_tools(req: ChatCompletionRequest) -> None:
    if req.tools and req.functions:
        raise InvalidRequest("Give 'tools' or the deprecated 'functions', not both.", param="functions")
    if req.tool_choice is not None and not req.tools:
        raise InvalidRequest("'tool_choice' is only allowed when 'tools' are given.", param="tool_choice")
    if req.function_call is not None and not req.functions:
        raise InvalidRequest("'function_call' is only allowed when 'functions' are given.", param="function_call")
    functions, mode = req.tool_mode()
    param = "functions" if req.legacy_functions() else "tools"
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequest("Tool names must be unique.", param=param)
    if mode not in ("none", "auto", "required") and mode not in names:
        raise InvalidRequest(
            f"The tool choice names '{mode}', which is not among the {param}.",
            param="function_call" if req.legacy_functions() else "tool_choice",
        )
    if mode != "none" and req.response_format is not None and req.response_format.type != "text":
        raise Unsupported(
            "response_format together with tools is not supported; use a tool whose parameters are the schema.",
            param="response_format",
        )
