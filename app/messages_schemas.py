"""Anthropic Messages API request bodies (/v1/messages, /v1/messages/count_tokens) the API accepts.

As app/schemas.py does for OpenAI's: unknown fields are ignored (Claude Code sends `cache_control`,
`thinking`, beta fields; none changes what a client gets back beyond what this server can do), types
are strict. Content blocks and tools of a type this server cannot honour still parse, so that the
translation (app/serving_messages.py) refuses them with a 400 naming the type and where it is,
instead of a validation error listing every block type it could have been.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag

from app.schemas import Body, integer


class TextBlockIn(Body):
    type: Literal["text"]
    text: str


class ToolUseBlockIn(Body):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


def _other_than(*known: str):
    # In the OpenAPI document, so that a known block or tool matches one member of its union only.
    return Field(json_schema_extra={"not": {"enum": list(known)}})


class OtherBlockIn(Body):
    """A block of any other type (image, document, thinking, server tool blocks, ...)."""

    type: str = _other_than("text", "tool_use", "tool_result")


def _tagged(classes: dict[str, type], fallback: type, what: str, untyped: type | None = None):
    """A union told apart by its `type` field; a type not in `classes` is `fallback` (refused later, by name),
    no type at all is `untyped` (or an error). Tags are class names: app/errors.py leaves capitalised union
    tags out of an error's param."""

    def tag(value) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        if kind is None and untyped is not None:
            return untyped.__name__
        if not isinstance(kind, str):
            return None
        return classes.get(kind, fallback).__name__

    members = list(dict.fromkeys([*classes.values(), fallback]))
    return Annotated[
        Union[tuple(Annotated[cls, Tag(cls.__name__)] for cls in members)],
        # No custom_error_context: a dict in it makes the type unhashable inside a `str | list[...]` union.
        Discriminator(tag, custom_error_type="invalid_type", custom_error_message=f"Input should be {what} with a string 'type'"),
    ]


ResultPartIn = _tagged({"text": TextBlockIn}, OtherBlockIn, "a content block")


class ToolResultBlockIn(Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPartIn] | None = None
    is_error: bool | None = None


ContentBlockIn = _tagged({"text": TextBlockIn, "tool_use": ToolUseBlockIn, "tool_result": ToolResultBlockIn},
                         OtherBlockIn, "a content block")


class MessageParamIn(Body):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlockIn], Field(min_length=1)]


class CustomToolIn(Body):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]


class OtherToolIn(Body):
    """A server or built-in tool (web search, bash, text editor, computer use, ...)."""

    type: str = _other_than("custom")


ToolIn = _tagged({"custom": CustomToolIn}, OtherToolIn, "a tool", untyped=CustomToolIn)


class ToolChoiceIn(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="type 'tool': the tool to call")
    disable_parallel_tool_use: bool | None = None


class OutputFormatIn(Body):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigIn(Body):
    format: OutputFormatIn | None = Field(None, description="structured outputs: the reply's text follows the schema")


class MetadataIn(Body):
    user_id: str | None = None


class CountTokensRequest(Body):
    """What the prompt is made of: the body of /v1/messages/count_tokens, and the start of /v1/messages'."""

    model: str = Field(description="the id /v1/models lists")
    messages: list[MessageParamIn] = Field(min_length=1)
    system: str | list[TextBlockIn] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: integer(ge=1)
    stop_sequences: Annotated[list[str], Field(max_length=16)] | None = Field(
        None, description="up to 16; the one that ended the reply is stop_sequence")
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="default 1; 0 is greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: integer(ge=0) | None = Field(None, description="sample among the k most likely tokens only")
    metadata: MetadataIn | None = None
    output_config: OutputConfigIn | None = None
    stream: bool | None = False
