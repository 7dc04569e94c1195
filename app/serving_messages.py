"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API as a front door onto chat.

A Messages body becomes a ChatCompletionRequest (`chat_request`): the system prompt and text blocks as
chat messages, `tool_use` blocks as the assistant's tool_calls, `tool_result` blocks as tool messages,
tools as functions. It then runs exactly as /v1/chat/completions runs it (request building, Generation,
ChatResponder: templates, tool grammar, prompt cache, batcher, cancellation), and the chat result is
translated back: a Message, or Anthropic's SSE events. Only what chat has no word for travels beside it:
top_k, and the stop string that ended the reply (MessagesGeneration).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    MessageTokensCount,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from app.errors import APIError, InvalidRequest, Unsupported, anthropic_error
from app.generation import Generation, named_sse, new_request_id
from app.messages_schemas import (
    CountTokensRequest,
    CustomToolIn,
    MessageParamIn,
    MessagesRequest,
    TextBlockIn,
    ToolResultBlockIn,
    ToolUseBlockIn,
)
from app.replicas import Router
from app.request_log import RequestRecord
from app.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    FunctionCallIn,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    SystemMessage,
    Tool,
    ToolCallIn,
    ToolMessage,
    UserMessage,
    check_transmittable,
    reject_unsupported,
)
from app.serving_chat import ChatResponder, build_request
from common.protocol import DoneEvent

# Blocks the model never sees: earlier turns' thinking, which Anthropic's API drops from the prompt too.
_DROPPED = ("thinking", "redacted_thinking")
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request a Messages body means (count_tokens: the same prompt, no tokens to generate);
    a 400 naming the first part of it this server cannot honour."""
    check_transmittable(body)  # before the translation, so that the error names the Anthropic field
    messages = [SystemMessage(role="system", content=_joined(body.system))] if body.system else []
    for i, m in enumerate(body.messages):
        messages += _chat_messages(m, f"messages[{i}]")
    if body.messages[-1].role == "assistant":
        raise Unsupported("A final assistant message (prefilling the reply) is not supported; end with a user message.",
                          param=f"messages[{len(body.messages) - 1}]")
    fields = dict(model=body.model, messages=messages, max_tokens=0, **_tool_fields(body))
    if isinstance(body, MessagesRequest):
        fields.update(max_tokens=body.max_tokens, stop=body.stop_sequences, temperature=body.temperature,
                      top_p=body.top_p, user=body.metadata.user_id if body.metadata else None, stream=body.stream,
                      stream_options=StreamOptions(include_usage=True) if body.stream else None)
        if body.output_config and body.output_config.format:  # structured outputs, as chat's response_format
            fields["response_format"] = ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
                name="output", schema=body.output_config.format.schema_))
    chat = ChatCompletionRequest(**fields)
    reject_unsupported(chat)
    return chat


def _joined(blocks: str | list[TextBlockIn]) -> str:
    # Blocks are separate paragraphs (Claude Code sends its system prompt and reminders as several):
    # joined without a break, a block's last word would run into the next one's first.
    return blocks if isinstance(blocks, str) else "\n\n".join(b.text for b in blocks)


def _chat_messages(m: MessageParamIn, param: str) -> list:
    """One Anthropic message as chat messages: an assistant turn with its calls, or a user turn's tool
    results (each a tool message, as chat has them) followed by its text."""
    blocks = [TextBlockIn(type="text", text=m.content)] if isinstance(m.content, str) else m.content
    allowed = ("text", "tool_use", *_DROPPED) if m.role == "assistant" else ("text", "tool_result")
    for j, b in enumerate(blocks):
        if b.type not in allowed:
            raise Unsupported(f"Content blocks of type '{b.type}' are not supported in a {m.role} message; only "
                              f"{', '.join(repr(t) for t in allowed if t not in _DROPPED)}.", param=f"{param}.content[{j}]")
    texts = [b for b in blocks if isinstance(b, TextBlockIn)]
    if m.role == "assistant":
        calls = [ToolCallIn(id=b.id, function=FunctionCallIn(name=b.name, arguments=json.dumps(b.input, ensure_ascii=False)))
                 for b in blocks if isinstance(b, ToolUseBlockIn)]
        return [AssistantMessage(role="assistant", content=_joined(texts) if texts else None, tool_calls=calls or None)]
    out = [ToolMessage(role="tool", tool_call_id=b.tool_use_id, content=_result_text(b, f"{param}.content[{j}]"))
           for j, b in enumerate(blocks) if isinstance(b, ToolResultBlockIn)]
    if texts or not out:
        out.append(UserMessage(role="user", content=_joined(texts)))
    return out


def _result_text(b: ToolResultBlockIn, param: str) -> str:
    parts = [TextBlockIn(type="text", text=b.content)] if isinstance(b.content, str) else b.content or []
    for k, part in enumerate(parts):
        if not isinstance(part, TextBlockIn):
            raise Unsupported(f"Tool results with content of type '{part.type}' are not supported; only 'text'.",
                              param=f"{param}.content[{k}]")
    text = _joined(parts)
    # Chat's tool message has no field for a failed call: the model reads that it failed.
    return f"Error: {text}" if b.is_error else text


def _tool_fields(body: CountTokensRequest) -> dict:
    for i, t in enumerate(body.tools or []):
        if not isinstance(t, CustomToolIn):
            raise Unsupported(f"Tools of type '{t.type}' (server tools) are not supported; only custom tools with "
                              "an input_schema.", param=f"tools[{i}].type")
        if t.input_schema.get("type") != "object":  # as Anthropic requires: a call's input is an object
            raise InvalidRequest("A tool's input_schema must be a JSON schema of type 'object'.",
                                 param=f"tools[{i}].input_schema.type")
    choice = body.tool_choice
    if not body.tools:
        # Without tools, 'auto' and 'none' ask for what happens anyway; 'any' and 'tool' cannot be honoured.
        if choice is not None and choice.type not in ("auto", "none"):
            raise InvalidRequest(f"tool_choice '{choice.type}' needs 'tools'.", param="tool_choice")
        return {}
    fields = {"tools": [Tool(type="function", function=FunctionDefinition(
        name=t.name, description=t.description, parameters=t.input_schema)) for t in body.tools]}
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise InvalidRequest("tool_choice of type 'tool' needs a 'name'.", param="tool_choice.name")
            fields["tool_choice"] = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
        else:
            fields["tool_choice"] = _TOOL_CHOICES[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    return fields


class MessagesGeneration(Generation):
    """The chat request's Generation, with top_k (chat has none) and the stop string that ended the reply
    (chat's finish reason does not say which)."""

    def __init__(self, router: Router, body: CountTokensRequest, chat: ChatCompletionRequest, model: str,
                 record: RequestRecord | None = None):
        req = build_request(chat)
        if isinstance(body, MessagesRequest) and body.top_k:
            req.top_k = body.top_k
        super().__init__(router, [req], model, record)
        self.stop_sequence: str | None = None

    async def events(self) -> AsyncIterator:
        async for ev in super().events():
            if isinstance(ev, DoneEvent):
                self.stop_sequence = ev.stop_sequence
            yield ev


def _usage(u: CompletionUsage, cls=Usage):
    # Anthropic's input_tokens leaves out the tokens read from the cache: its total input is input_tokens +
    # cache_read_input_tokens + cache_creation_input_tokens. Nothing is billed as a cache write here (the
    # prompt cache keeps every prompt by itself): creation is 0.
    cached = (u.prompt_tokens_details.cached_tokens or 0) if u.prompt_tokens_details else 0
    return cls(input_tokens=u.prompt_tokens - cached, output_tokens=u.completion_tokens,
               cache_read_input_tokens=cached, cache_creation_input_tokens=0)


def _tool_use_id(chat_call_id: str) -> str:
    return "toolu_" + chat_call_id.removeprefix("call_")


class MessagesResponder:
    def __init__(self, body: MessagesRequest, chat: ChatCompletionRequest, model: str, gen: MessagesGeneration):
        self.body = body
        self.model = model
        self.gen = gen
        self.chat = ChatResponder(chat, model, gen)
        self.id = "msg_" + new_request_id()[:24]

    def _stop(self, finish: str | None) -> tuple[str, str | None]:
        """Anthropic's stop_reason and stop_sequence for chat's finish reason."""
        if finish == "length":
            return "max_tokens", None
        if finish == "tool_calls":
            return "tool_use", None
        matched = self.gen.stop_sequence
        if matched is not None and matched in (self.body.stop_sequences or []):
            return "stop_sequence", matched
        return "end_turn", None  # the model's end of turn (or a chat template's stop string)

    def _message(self, content: list, usage: CompletionUsage, finish: str | None = None, final: bool = True) -> Message:
        reason, sequence = self._stop(finish) if final else (None, None)
        return Message(id=self.id, type="message", role="assistant", model=self.model, content=content,
                       stop_reason=reason, stop_sequence=sequence, usage=_usage(usage))

    async def full(self) -> Message:
        completion = await self.chat.full()
        choice = completion.choices[0]
        content = [TextBlock(type="text", text=choice.message.content)] if choice.message.content else []
        content += [ToolUseBlock(type="tool_use", id=_tool_use_id(c.id), name=c.function.name,
                                 input=json.loads(c.function.arguments or "{}"))
                    for c in choice.message.tool_calls or []]
        return self._message(content, completion.usage, choice.finish_reason)

    async def stream(self) -> AsyncIterator[dict]:
        """Anthropic's event sequence: message_start, a ping, each block's start, deltas and stop (text as it
        comes; a tool call whole, its input as one input_json_delta), message_delta, message_stop. An error
        once the stream has started is an `error` event, as Anthropic sends it."""
        yield named_sse(RawMessageStartEvent(type="message_start", message=self._message([], self.gen.usage(0), final=False)))
        yield {"event": "ping", "data": json.dumps({"type": "ping"})}
        index, text_open, finish, usage = 0, False, None, self.gen.usage(0)
        try:
            async for data in self.chat.stream():
                if data == "[DONE]":
                    break
                chunk = ChatCompletionChunk.model_validate_json(data)
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    if choice.delta.content:
                        if not text_open:
                            yield named_sse(RawContentBlockStartEvent(type="content_block_start", index=index,
                                                                   content_block=TextBlock(type="text", text="")))
                            text_open = True
                        yield named_sse(RawContentBlockDeltaEvent(type="content_block_delta", index=index,
                                                               delta=TextDelta(type="text_delta", text=choice.delta.content)))
                    for call in choice.delta.tool_calls or []:
                        if text_open:
                            yield named_sse(RawContentBlockStopEvent(type="content_block_stop", index=index))
                            index, text_open = index + 1, False
                        block = ToolUseBlock(type="tool_use", id=_tool_use_id(call.id), name=call.function.name, input={})
                        yield named_sse(RawContentBlockStartEvent(type="content_block_start", index=index, content_block=block))
                        yield named_sse(RawContentBlockDeltaEvent(type="content_block_delta", index=index, delta=InputJSONDelta(
                            type="input_json_delta", partial_json=call.function.arguments or "{}")))
                        yield named_sse(RawContentBlockStopEvent(type="content_block_stop", index=index))
                        index += 1
        except APIError as e:
            yield {"event": "error", "data": json.dumps(anthropic_error(e)[1])}
            return
        if text_open:
            yield named_sse(RawContentBlockStopEvent(type="content_block_stop", index=index))
        reason, sequence = self._stop(finish)
        yield named_sse(RawMessageDeltaEvent(type="message_delta", delta=Delta(stop_reason=reason, stop_sequence=sequence),
                                          usage=_usage(usage, MessageDeltaUsage)))
        yield named_sse(RawMessageStopEvent(type="message_stop"))


class TokenCounter:
    """count_tokens as a generation of no tokens: the model server renders the prompt with the chat template
    and the tools and tokenizes it, exactly as /v1/messages would (it has no other way to render one). The
    prompt is prefilled on the way, into the prompt cache, where the /v1/messages call that usually
    follows finds it."""

    def __init__(self, gen: Generation):
        self.gen = gen

    async def full(self) -> MessageTokensCount:
        async for _ in self.gen.events():  # the one done event, so that the request log sees it end
            pass
        return MessageTokensCount(input_tokens=self.gen.usage(0).prompt_tokens)
