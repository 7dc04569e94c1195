"""OpenAI request bodies the API accepts, with the limits OpenAI documents.

Responses are built from the `openai` package's own types (see serving_*.py). Unknown fields are
ignored, as OpenAI-compatible servers do; fields we know but do not support yet are rejected with a
clear 400 in `reject_unsupported`. Types are strict, as OpenAI's are ("2" is not an integer, 1 not a
boolean). Ranges are in the models, so FastAPI's OpenAPI document states them; the one range only the
model server knows, token ids below its vocabulary size (prompt token arrays, logit_bias keys), is
checked there (backend/prepare.py) and comes back as a 400 before any byte is streamed.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, WithJsonSchema
from pydantic_core import PydanticCustomError

from app.errors import InvalidRequest, Unsupported
from common.schema_refs import unresolved_refs

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _integral(value):
    # JSON Schema's integer includes 1.0; strict pydantic would refuse it. 1.5, "1" and true stay refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**constraints):
    """An integer field's type: constraints inside, so the OpenAPI schema states them as minimum/maximum."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


Choices = integer(ge=1, le=128)
# int64 as -2**63 <= seed < 2**63: both bounds are exact as JSON numbers (FastAPI writes OpenAPI bounds as
# floats, and 2**63 - 1 as a float is 2**63).
Seed = integer(ge=INT64_MIN, lt=INT64_MAX + 1)
Count = integer(ge=0)
# A token id as text (a logit_bias key). Ten digits hold every llama.cpp token id (int32); the model
# server checks it against its vocabulary.
_TOKEN_KEY = re.compile(r"[0-9]{1,10}")
TOKEN_KEY_PATTERN = "^[0-9]{1,10}$"

TokenId = integer(ge=0, description="a token id, below the model's vocabulary size")
TokenArray = Annotated[list[TokenId], Field(min_length=1)]


def _check_logit_bias(bias: dict[str, float]) -> dict[str, float]:
    for key, value in bias.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise PydanticCustomError("token_id", "keys must be token ids (decimal integers), got {key}", {"key": _quoted(key)})
        if not -100 <= value <= 100:
            raise PydanticCustomError("bias_range", "biases must be in [-100, 100], got {value} for token {key}",
                                      {"value": value, "key": key})
    return bias


def _quoted(text: str) -> str:
    """The client's text quoted for an error message; escaped when UTF-8 cannot encode it (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(text)
    return json.dumps(text, ensure_ascii=False)


LogitBias = Annotated[
    dict[str, float],
    AfterValidator(_check_logit_bias),
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": TOKEN_KEY_PATTERN},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
]


class Body(BaseModel):
    """A part of a request body: unknown fields ignored, types strict."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="the id /v1/models lists")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: Choices | None = Field(1, description="choices per prompt")
    stop: str | list[str] | None = Field(None, description="up to 16 stop strings; never emitted")
    seed: Seed | None = Field(None, description="same seed, same output (int64)")
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = Field(None, description="token id -> bias in [-100, 100]")
    ignore_eos: bool | None = Field(False, description="vLLM extension: keep generating past EOS (benchmarks)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JsonSchemaFormat(Body):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Body):
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
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenArray
        | Annotated[list[TokenArray], Field(min_length=1)]
    ) = Field(description="a string, a list of strings, a token array or a list of token arrays")
    max_tokens: Count | None = Field(16, description="OpenAI's default is 16; null: up to the context")
    logprobs: integer(ge=0, le=5) | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: integer(ge=0, le=20) | None = Field(None, description="only equal to n is supported")
    response_format: ResponseFormat | None = Field(None, description="extension (as vLLM and llama-server): JSON output")


class TextPart(Body):
    type: str
    text: str | None = None


class FunctionCallIn(Body):
    name: str
    arguments: str = ""


class ToolCallIn(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(Body):
    """A chat message; one class per role (below), as in OpenAI's schema, so the OpenAPI document says
    what each role needs (a tool result its tool_call_id, a legacy function result its name)."""

    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content or [])


class SystemMessage(MessageIn):
    role: Literal["system"]


class DeveloperMessage(MessageIn):
    role: Literal["developer"]


class UserMessage(MessageIn):
    role: Literal["user"]


class AssistantMessage(MessageIn):
    role: Literal["assistant"]
    tool_calls: list[ToolCallIn] | None = None
    function_call: FunctionCallIn | None = None  # legacy


class ToolMessage(MessageIn):
    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1, description="the id of the call this message answers")


class FunctionMessage(MessageIn):
    """Legacy: the result of a function call."""

    role: Literal["function"]
    name: str = Field(min_length=1)


_MESSAGES = {"system": SystemMessage, "developer": DeveloperMessage, "user": UserMessage,
             "assistant": AssistantMessage, "tool": ToolMessage, "function": FunctionMessage}


def _message_tag(value) -> str | None:
    # Tags are the class names: errors inside a message then name the field, not the role (app/errors.py
    # drops capitalised union tags from a param).
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    cls = _MESSAGES.get(role) if isinstance(role, str) else None
    return cls.__name__ if cls is not None else None


ChatMessageIn = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in _MESSAGES.values())],
    Discriminator(
        _message_tag,
        custom_error_type="invalid_role",
        custom_error_message=f"Input should have a 'role' of {', '.join(repr(r) for r in _MESSAGES)}",
        custom_error_context={"discriminator": "role"},
    ),
]


class FunctionDefinition(Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: Count | None = Field(None, description="deprecated by OpenAI; same as max_completion_tokens")
    max_completion_tokens: Count | None = None
    logprobs: bool | None = False
    top_logprobs: integer(ge=0, le=20) | None = None
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128)] | None = Field(
        None, description="deprecated by OpenAI: tools")
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


# Deepest nesting of a request's parts (a JSON schema in response_format or a tool's parameters
# counts its own levels). The protocol's JSON parser stops at 200 levels and its serializer near 250;
# the tool-call grammar wraps parameters in ~10 more.
MAX_DEPTH = 64


def check_transmittable(value: Any, param: str = "", depth: int = 0) -> None:
    """Raise a 400 naming the part of a request the model server could not be sent: text that is not
    Unicode (a lone UTF-16 surrogate, which JSON's \\u escapes allow) or nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        field = param.split(".")[0].split("[")[0]
        raise InvalidRequest(f"'{field}' is nested more than {MAX_DEPTH} levels deep.", param=field or None)
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"'{param}' holds text that is not valid Unicode (a lone surrogate).",
                                     param=param or None) from None
    elif isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            check_transmittable(getattr(value, name), _join(param, field.alias or name), depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_transmittable(key, param, depth + 1)
            check_transmittable(item, _join(param, str(key)), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_transmittable(item, f"{param}[{i}]", depth + 1)


def _join(param: str, name: str) -> str:
    return f"{param}.{name}" if param else name


def reject_unsupported(req: SamplingFields) -> None:
    """Raise a 400 naming the first field we accept in the schema but cannot honour yet."""
    check_transmittable(req)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    if len(req.stop_list()) > 16:
        raise InvalidRequest("At most 16 stop sequences are supported.", param="stop")
    if req.response_format is not None:
        schema = req.response_format.schema_or_none()
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequest("The JSON schema must be an object.", param="response_format")
        if schema is not None:
            _check_refs(schema, "response_format")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise Unsupported("'suffix' (insertion) is not supported yet.", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise Unsupported("'best_of' other than n is not supported yet.", param="best_of")
    if isinstance(req, ChatCompletionRequest):
        _check_tools(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        _check_history(req.messages)
        for i, m in enumerate(req.messages):
            for part in m.content if isinstance(m.content, list) else []:
                if part.type != "text" or part.text is None:
                    raise Unsupported(
                        f"Content parts of type '{part.type}' are not supported; only 'text'.",
                        param=f"messages[{i}].content",
                    )


def _check_refs(schema: dict, param: str) -> None:
    unresolved = unresolved_refs(schema)
    if unresolved:
        raise InvalidRequest(
            f"'{param}' holds a $ref that cannot be resolved: {_quoted(unresolved[0])} (only references inside "
            "the schema, '#' or '#/...' JSON pointers such as '#/$defs/Name', are followed).", param=param)


def _check_history(messages: list) -> None:
    """Earlier calls in the history are what a model wrote and a client parsed: arguments that are not
    JSON cannot be shown to the model as a call (vLLM answers 400 as well; empty means no arguments)."""
    for i, m in enumerate(messages):
        if m.role in ("system", "developer", "user", "tool") and m.content is None:
            raise InvalidRequest(f"Invalid value for 'messages[{i}].content': a {m.role} message needs content.",
                                 param=f"messages[{i}].content")
        if m.role != "assistant":
            continue
        named = [(f"messages[{i}].tool_calls[{j}].function.arguments", c.function) for j, c in enumerate(m.tool_calls or [])]
        if m.function_call is not None:
            named.append((f"messages[{i}].function_call.arguments", m.function_call))
        for param, fn in named:
            if not fn.arguments.strip():
                continue
            try:
                json.loads(fn.arguments)
            except (json.JSONDecodeError, RecursionError) as e:
                raise InvalidRequest(f"Invalid value for '{param}': the arguments of call '{fn.name}' are not valid "
                                     f"JSON ({e.msg if hasattr(e, 'msg') else 'nested too deep'}).", param=param) from None


def _check_tools(req: ChatCompletionRequest) -> None:
    if req.tools and req.functions:
        raise InvalidRequest("Give 'tools' or the deprecated 'functions', not both.", param="functions")
    if req.tool_choice is not None and not req.tools:
        raise InvalidRequest("'tool_choice' is only allowed when 'tools' are given.", param="tool_choice")
    if req.function_call is not None and not req.functions:
        raise InvalidRequest("'function_call' is only allowed when 'functions' are given.", param="function_call")
    functions, mode = req.tool_mode()
    param = "functions" if req.legacy_functions() else "tools"
    for i, f in enumerate(functions):
        if f.parameters is not None:
            _check_refs(f.parameters, f"{param}[{i}].parameters" if param == "functions" else f"tools[{i}].function.parameters")
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
