"""The body of POST /v1/responses (OpenAI's Responses API), with the limits OpenAI documents.

As app/schemas.py: unknown fields ignored, types strict, ranges in the models. Input items, tools and
content parts of kinds this server cannot honour (images, files, built-in tools such as web search)
parse as `Other*` and are refused by `check` with a 400 naming the kind, rather than a generic
"does not match" from pydantic.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag
from pydantic_core import PydanticCustomError

from app.errors import InvalidRequest, Unsupported
from app.schemas import Body, Count, FunctionDefinition, check_transmittable, integer

TEXT_PARTS = ("input_text", "output_text")


class ContentPart(Body):
    type: str
    text: str | None = None


def parts_text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text or "" for p in content)


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str = Field(description="the arguments as a JSON text ('' for none)")


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]


class OtherItem(Body):
    """An item kind this server does not take (item_reference, reasoning, built-in tool calls...)."""

    type: str


_ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}


def _tagged(known: dict, other: type, default=None):
    """A union told apart by `type` (`default` where a value has none), anything else as `other`."""

    def tag(value) -> str | None:
        kind = value.get("type", default(value) if default else None) if isinstance(value, dict) else getattr(value, "type", None)
        if not isinstance(kind, str):
            return None
        return known[kind].__name__ if kind in known else other.__name__

    names = ", ".join(repr(k) for k in known)
    return Annotated[
        Union[tuple(Annotated[c, Tag(c.__name__)] for c in (*known.values(), other))],
        # No custom_error_context (as app.schemas' messages have): its dict makes the type unhashable in `| None`.
        Discriminator(tag, custom_error_type="invalid_type", custom_error_message=f"Input should have a 'type' of {names}"),
    ]


# A message may leave out its type ("easy input message": role and content only).
InputItem = _tagged(_ITEMS, OtherItem, default=lambda v: "message" if "role" in v else None)


class FunctionTool(FunctionDefinition):
    """Responses' function tool: the chat tool's function, flattened."""

    type: Literal["function"]


class OtherTool(Body):
    type: str


ToolIn = _tagged({"function": FunctionTool}, OtherTool)


class ToolChoiceObject(Body):
    type: str
    name: str | None = None


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None


def _check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > 16:
        raise PydanticCustomError("metadata", "at most 16 keys, got {n}", {"n": len(metadata)})
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise PydanticCustomError("metadata", "keys are at most 64 characters and values at most 512 ({key})",
                                      {"key": key[:64]})
    return metadata


class ResponsesRequest(Body):
    model: str = Field(description="the id /v1/models lists")
    input: str | list[InputItem] = Field(description="a user message's text, or a list of input items")
    instructions: str | None = Field(None, description="a system message placed first (not carried to a next response)")
    tools: Annotated[list[ToolIn], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: Count | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: integer(ge=0, le=20) | None = None
    include: list[str] | None = Field(None, description="'message.output_text.logprobs' is honoured; the rest name "
                                      "data this server does not produce")
    metadata: Annotated[dict[str, str], AfterValidator(_check_metadata)] | None = None
    user: str | None = None
    store: bool | None = Field(True, description="keep the response for GET and previous_response_id")
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool | None = False
    background: bool | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    reasoning: dict | None = None

    def function_tools(self) -> list[FunctionTool]:
        return [t for t in self.tools or [] if isinstance(t, FunctionTool)]

    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])


def _refuse_part(parts, param: str, allowed=TEXT_PARTS) -> None:
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        if part.type not in allowed or part.text is None:
            raise Unsupported(f"Content parts of type '{part.type}' are not supported; only "
                              f"{' and '.join(repr(a) for a in allowed)} (text).", param=f"{param}[{j}]")


def check(req: ResponsesRequest) -> None:
    """Raise a 400 naming the first part of the request this server cannot honour."""
    check_transmittable(req)
    for name, why in (("background", "background responses"), ("conversation", "the Conversations API"),
                      ("prompt", "prompt templates")):
        if getattr(req, name):
            raise Unsupported(f"'{name}' ({why}) is not supported; send the input itself.", param=name)
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise Unsupported("'reasoning' is not supported with this model.", param="reasoning")
    for i, item in enumerate(req.input if isinstance(req.input, list) else []):
        if isinstance(item, OtherItem):
            raise Unsupported(f"Input items of type '{item.type}' are not supported; only 'message', 'function_call' "
                              "and 'function_call_output'.", param=f"input[{i}].type")
        if isinstance(item, MessageItem):
            _refuse_part(item.content, f"input[{i}].content")
        elif isinstance(item, FunctionCallOutputItem):
            _refuse_part(item.output, f"input[{i}].output", ("input_text",))
    for i, tool in enumerate(req.tools or []):
        if isinstance(tool, OtherTool):
            raise Unsupported(f"Tools of type '{tool.type}' are not supported; only 'function' tools.", param=f"tools[{i}].type")
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceObject) and (choice.type != "function" or not choice.name):
        raise (Unsupported(f"A tool_choice of type '{choice.type}' is not supported; use 'auto', 'none', 'required' "
                           "or {'type': 'function', 'name': ...}.", param="tool_choice.type") if choice.type != "function"
               else InvalidRequest("Missing required parameter: 'tool_choice.name'.", param="tool_choice.name",
                                   code="missing_required_parameter"))
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        for field in ("name", "schema_"):
            if getattr(fmt, field) is None:
                name = field.rstrip("_")
                raise InvalidRequest(f"Missing required parameter: 'text.format.{name}'.", param=f"text.format.{name}",
                                     code="missing_required_parameter")
    if fmt is not None and fmt.type != "text" and req.function_tools() and req.tool_choice != "none":
        raise Unsupported("text.format other than 'text' together with tools is not supported; use a tool whose "
                          "parameters are the schema.", param="text.format")
