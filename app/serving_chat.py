"""POST /v1/chat/completions: chat messages rendered by the model server's chat template.

Structured outputs (`response_format`) and tools become a grammar the model server decodes under.
With tools, the model writes one JSON object in the generic format (common/tool_format.py), and
the responder turns it into `message.tool_calls` (or `function_call` for the deprecated fields):
only complete, distinct calls (common/tool_reply.py), streamed one whole call per delta.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion_message import FunctionCall
from openai.types.chat.chat_completion_message_function_tool_call import Function
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaFunctionCall,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_token_logprob import TopLogprob

from app.generation import Generation, new_request_id, sampling_kwargs
from app.schemas import ChatCompletionRequest, ChatMessageIn
from common import tool_format
from common.tool_reply import Content, ReplyReader
from common.protocol import ChatMessage, DeltaEvent, GenerationRequest, Grammar, TokenLogprob, ToolCall, ToolDefinition


def build_request(req: ChatCompletionRequest) -> GenerationRequest:
    functions, mode = req.tool_mode()
    tools, grammar = [], None
    if mode != "none":
        tools = [
            ToolDefinition(name=f.name, description=f.description or "",
                           parameters=f.parameters or {"type": "object", "properties": {}})
            for f in functions
        ]
        parallel = req.parallel_tool_calls is not False and not req.legacy_functions()
        grammar = Grammar(type="json_schema", value=tool_format.reply_schema(tools, mode, parallel),
                          param="functions" if req.legacy_functions() else "tools")
    elif req.response_format is not None and (schema := req.response_format.schema_or_none()) is not None:
        grammar = Grammar(type="json_schema", value=schema, param="response_format")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return GenerationRequest(
        id=new_request_id(),
        messages=protocol_messages(req.messages),
        tools=tools,
        grammar=grammar,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        **sampling_kwargs(req),
    )


def protocol_messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the results that answer them
    for i, m in enumerate(messages):
        if m.role == "assistant" and (m.tool_calls or m.function_call):
            calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls or []]
            if m.function_call is not None:
                calls.append(ToolCall(id=f"call_{i}", name=m.function_call.name, arguments=m.function_call.arguments))
            names.update((c.id, c.name) for c in calls)
            out.append(ChatMessage(role="assistant", content=m.text(), tool_calls=calls))
        elif m.role == "tool":
            out.append(ChatMessage(role="tool", content=m.text(), tool_call_id=m.tool_call_id, name=names.get(m.tool_call_id)))
        elif m.role == "function":
            out.append(ChatMessage(role="tool", content=m.text(), name=m.name))
        else:
            out.append(ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()))
    return out


def _chat_logprobs(entries: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=e.token,
            bytes=e.bytes,
            logprob=e.logprob,
            top_logprobs=[TopLogprob(token=t.token, bytes=t.bytes, logprob=t.logprob) for t in e.top],
        )
        for e in entries
    ]


def _message(**fields) -> ChatCompletionMessage:
    # refusal set, not left unset: the published schema requires it (null: the model refused nothing).
    return ChatCompletionMessage(role="assistant", refusal=None, **fields)


def _call_id() -> str:
    return "call_" + new_request_id()[:24]


class ChatResponder:
    def __init__(self, req: ChatCompletionRequest, model: str, gen: Generation):
        self.req = req
        self.model = model
        self.gen = gen
        self.id = "chatcmpl-" + new_request_id()
        self.created = int(time.time())
        self.n = req.n or 1
        _, mode = req.tool_mode()
        self.tools = mode != "none"  # the reply is the generic tool format, read by ReplyReader
        self.legacy = self.tools and req.legacy_functions()

    def _finish(self, reason: str, calls: bool) -> str:
        if calls and reason == "stop":
            return "function_call" if self.legacy else "tool_calls"
        return reason

    async def full(self) -> ChatCompletion:
        texts = {i: [] for i in range(self.n)}
        logprobs: dict[int, list] = {i: [] for i in range(self.n)}
        finish: dict[int, str] = {}
        completion_tokens = 0
        async for ev in self.gen.events():
            if isinstance(ev, DeltaEvent):
                texts[ev.index].append(ev.text)
                if ev.logprobs:
                    logprobs[ev.index].extend(_chat_logprobs(ev.logprobs))
            else:
                finish[ev.index] = ev.finish_reason
                completion_tokens += ev.completion_tokens
        choices = []
        for i in range(self.n):
            text, reason = "".join(texts[i]), finish.get(i, "stop")
            message = _message(content=text)
            if self.tools:
                message, reason = self._tool_message(text, reason)
            choices.append(Choice(
                index=i, message=message, finish_reason=reason,
                logprobs=ChoiceLogprobs(content=logprobs[i], refusal=None) if self.req.logprobs else None,
            ))
        return ChatCompletion(
            id=self.id, object="chat.completion", created=self.created, model=self.model, choices=choices,
            usage=self.gen.usage(completion_tokens),
        )

    def _tool_message(self, text: str, reason: str) -> tuple[ChatCompletionMessage, str]:
        reader = ReplyReader()
        reader.feed(text)
        if not reader.calls:
            # A text reply, or a reply cut short inside a call: no call, and no JSON passed off as text.
            content = reader.content if reader.started else text
            return _message(content=content), reason
        if self.legacy:
            call = reader.calls[0]
            message = _message(content=None, function_call=FunctionCall(name=call.name, arguments=call.arguments))
        else:
            message = _message(content=None, tool_calls=[
                ChatCompletionMessageToolCall(id=_call_id(), type="function",
                                              function=Function(name=c.name, arguments=c.arguments))
                for c in reader.calls
            ])
        return message, self._finish(reason, True)

    def _chunk(self, choice: ChunkChoice | None, usage=None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
            choices=[choice] if choice else [],
        )
        if self.req.include_usage():
            chunk.usage = usage  # OpenAI sends "usage": null on every chunk but the last
        return chunk.model_dump_json(exclude_unset=True)

    def _delta(self, index: int, delta: ChoiceDelta, logprobs=None, finish_reason=None) -> str:
        return self._chunk(ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs))

    def _tool_deltas(self, pieces: list) -> list[ChoiceDelta]:
        """Deltas of what the reader handed out: text as it comes, each call whole (id, name and
        arguments in its index's one delta) once its object has closed, so that a stream never holds
        a call its message would not."""
        out = []
        for p in pieces:
            if isinstance(p, Content):
                out.append(ChoiceDelta(content=p.text))
            elif self.legacy:
                if p.index == 0:  # one call: the deprecated field has room for no more
                    out.append(ChoiceDelta(function_call=ChoiceDeltaFunctionCall(name=p.name, arguments=p.arguments)))
            else:
                out.append(ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                    index=p.index, id=_call_id(), type="function",
                    function=ChoiceDeltaToolCallFunction(name=p.name, arguments=p.arguments),
                )]))
        return out

    async def stream(self) -> AsyncIterator[str]:
        for i in range(self.n):
            yield self._delta(i, ChoiceDelta(role="assistant", content=None if self.tools else ""))
        readers = {i: ReplyReader() for i in range(self.n)} if self.tools else {}
        completion_tokens = 0
        async for ev in self.gen.events():
            if isinstance(ev, DeltaEvent):
                lp = ChunkLogprobs(content=_chat_logprobs(ev.logprobs), refusal=None) if (self.req.logprobs and ev.logprobs) else None
                if self.tools:
                    for delta in self._tool_deltas(readers[ev.index].feed(ev.text)):
                        yield self._delta(ev.index, delta, lp)
                        lp = None
                    if lp:
                        yield self._delta(ev.index, ChoiceDelta(), lp)
                elif ev.text or lp:
                    yield self._delta(ev.index, ChoiceDelta(content=ev.text), lp)
            else:
                completion_tokens += ev.completion_tokens
                calls = self.tools and bool(readers[ev.index].calls)
                yield self._delta(ev.index, ChoiceDelta(), finish_reason=self._finish(ev.finish_reason, calls))
        if self.req.include_usage():
            yield self._chunk(None, usage=self.gen.usage(completion_tokens))
        yield "[DONE]"
