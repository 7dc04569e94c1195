"""The generic tool-calling format, written down once for both layers.

A model whose chat template does not render tools (the default GGUF has no template at all) sees the
tool list in its system turn and answers with one JSON object, constrained by a grammar built from
the tool schemas (as llama-server's generic handler does):

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}    a call (or several)
    {"content": "The answer is 4."}                                              a text reply

The API layer builds the grammar (`reply_schema`) and reads the reply (common/tool_reply.py); the
model server renders the instructions (`instructions`) and earlier calls (`reply_text`) into the
prompt. Names and arguments come out in that order because the
grammar orders the properties so.
"""

from __future__ import annotations

import json

from common import schema_refs
from common.protocol import ToolCall, ToolDefinition

CALLS_KEY = "tool_calls"
# Most calls in one reply when parallel calls are allowed: a small model may otherwise repeat a call
# until max_tokens.
MAX_PARALLEL_CALLS = 8
CONTENT_KEY = "content"

# Separators of the JSON the grammar allows (no free whitespace a model could spin in).
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "


def arguments_schema(tool: ToolDefinition) -> dict:
    arguments = dict(tool.parameters or {"type": "object"})
    if arguments.get("type") == "object" and "additionalProperties" not in arguments:
        # Only the declared parameters, as OpenAI's models give them: a schema that leaves extra keys
        # open lets a model copy the tool list into the arguments.
        arguments["additionalProperties"] = False
    return arguments


def call_schema(tool: ToolDefinition, arguments: dict | None = None) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments or arguments_schema(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def reply_schema(tools: list[ToolDefinition], mode: str, parallel: bool) -> dict:
    """The JSON schema of the model's reply. mode: 'auto' (a call or text), 'required' (at least one
    call), or a tool name (exactly one call of that tool).

    Parameters that use `$ref` (Pydantic's `$defs` for nested models, `#` for recursion) move to the
    reply's `$defs` under their tool's name, their references rewritten for that place, and the call
    refers to them there: inside the reply, `#` is the reply's root, not theirs."""
    if mode not in ("auto", "required"):
        tools = [t for t in tools if t.name == mode]
        parallel = False
    defs: dict[str, dict] = {}

    def one(tool: ToolDefinition) -> dict:
        arguments = arguments_schema(tool)
        if schema_refs.references(arguments):
            defs[tool.name] = schema_refs.rebase(arguments, f"/$defs/{tool.name}")
            arguments = {"$ref": f"#/$defs/{tool.name}"}
        return call_schema(tool, arguments)

    one_call = one(tools[0]) if len(tools) == 1 else {"anyOf": [one(t) for t in tools]}
    calls: dict = {"type": "array", "items": one_call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
    reply = {
        "type": "object", "properties": {CALLS_KEY: calls}, "required": [CALLS_KEY], "additionalProperties": False,
    }
    if mode == "auto":
        text_reply = {
            "type": "object", "properties": {CONTENT_KEY: {"type": "string"}}, "required": [CONTENT_KEY],
            "additionalProperties": False,
        }
        reply = {"anyOf": [reply, text_reply]}
    if defs:
        reply["$defs"] = defs
    return reply


def instructions(tools: list[ToolDefinition]) -> str:
    """What the system turn says about the tools and the reply format."""
    listed = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
        for t in tools
    )
    return (
        "You can call these tools (JSON schemas of their arguments):\n"
        f"{listed}\n"
        "Reply with one JSON object: either "
        f'{{"{CALLS_KEY}": [{{"name": <tool name>, "arguments": <arguments object>}}]}} to call tools, '
        f'or {{"{CONTENT_KEY}": <your answer>}} to answer in text.'
    )


def reply_text(calls: list[ToolCall], content: str = "") -> str:
    """An assistant turn as the model would have written it in this format (for the history)."""
    if not calls:
        return _dumps({CONTENT_KEY: content})
    items = []
    for c in calls:
        try:
            args = json.loads(c.arguments) if c.arguments.strip() else {}
        except json.JSONDecodeError:
            args = c.arguments  # keep what the client sent; the model sees it as it was
        items.append({"name": c.name, "arguments": args})
    return _dumps({CALLS_KEY: items})


def tool_result_text(message_name: str | None, call_id: str | None, content: str) -> str:
    """A tool's result as a user turn (templates without a tool role)."""
    label = " ".join(x for x in (message_name, f"(call {call_id})" if call_id else None) if x)
    return f"Tool result {label}:\n{content}" if label else f"Tool result:\n{content}"


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))
