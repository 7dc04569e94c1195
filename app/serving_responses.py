"""POST /v1/responses: OpenAI's Responses API as a front door onto the chat path.

A request becomes a chat completion request (`Turn`): `instructions` a system message, then the input
items (a stored response's conversation first, for `previous_response_id`), `function_call` items as
the assistant's `tool_calls`, `function_call_output` items as tool messages; function tools,
`tool_choice`, `text.format` as `response_format`, `max_output_tokens` as `max_tokens`. It runs through
the chat path's Generation and ChatResponder (template, tool grammar, prompt cache, batcher, request
log, cancellation), and the chat stream's chunks become the Responses stream's events. A response that
is not streamed is that stream's final response, so the two never differ. A continued conversation
renders as the chat messages of its previous turn plus that turn's reply, the prefix the model server's
prompt cache holds, as a chat client's next turn does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from openai.types import responses as oai
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import response_output_text, response_text_delta_event
from openai.types.shared import ResponseFormatJSONObject, ResponseFormatText
from pydantic import BaseModel, TypeAdapter

from app.errors import APIError, ContextLengthExceeded, InvalidRequest, TooManyRequests
from app.generation import Generation, named_sse, new_request_id
from app.replicas import Router
from app.request_log import RequestRecord
from app.responses_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MessageItem,
    ResponsesRequest,
    check,
    parts_text,
)
from app.responses_store import ResponseStore
from app.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    DeveloperMessage,
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
    reject_unsupported,
)
from app.serving_chat import ChatResponder, build_request

_ROLES = {"system": SystemMessage, "developer": DeveloperMessage, "user": UserMessage, "assistant": AssistantMessage}
_ITEMS = TypeAdapter(list[InputItem])


class Turn:
    """A Responses request as the chat completion request it runs as; `where` maps the chat request's
    params back to the Responses request's, so that every error names what the client sent."""

    def __init__(self, req: ResponsesRequest, store: ResponseStore):
        check(req)
        self.req = req
        history = store.continuation(req.previous_response_id, "previous_response_id") if req.previous_response_id else []
        new = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else list(req.input)
        # Stored items were checked when they came; their errors can only name the response they came from.
        self.items = _ITEMS.validate_python(history) + new
        self.sources = ["previous_response_id"] * len(history) + [f"input[{i}]" for i in range(len(new))]
        if not self.items and req.instructions is None:
            raise InvalidRequest("'input' is empty: give at least one item (or instructions).", param="input")
        self.chat = self._chat_request()

    def drop_oldest(self) -> bool:
        """Drop the oldest input item, and results left without the call they answer (truncation 'auto');
        False when only one is left to drop."""
        if len(self.items) <= 1:
            return False
        del self.items[0], self.sources[0]
        while len(self.items) > 1 and isinstance(self.items[0], FunctionCallOutputItem):
            del self.items[0], self.sources[0]
        self.chat = self._chat_request()
        return True

    def conversation(self) -> list[dict]:
        """The items as stored with the response: what a next turn continues."""
        return [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in self.items]

    def _chat_request(self) -> ChatCompletionRequest:
        req = self.req
        tools = [Tool(type="function", function=FunctionDefinition(**t.model_dump(exclude={"type"})))
                 for t in req.function_tools()]
        self.where = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens",
                      **{f"tools[{i}].function": f"tools[{i}]" for i in range(len(tools))}}
        choice = req.tool_choice
        if not isinstance(choice, str) and choice is not None:
            choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
        elif not tools and choice in ("auto", "none"):
            choice = None  # Responses takes them without tools (the Agents SDK sends them); chat refuses them
        fmt = req.text.format if req.text else None
        chat = ChatCompletionRequest(
            model=req.model, messages=self._messages(), max_tokens=req.max_output_tokens,
            temperature=req.temperature, top_p=req.top_p, user=req.user,
            tools=tools or None, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls if tools else None,
            response_format=None if fmt is None else ResponseFormat(type=fmt.type, json_schema=JsonSchemaFormat(
                name=fmt.name, description=fmt.description, schema_=fmt.schema_, strict=fmt.strict)
                if fmt.type == "json_schema" else None),
            logprobs=req.logprobs(), top_logprobs=(req.top_logprobs or 0) if req.logprobs() else None,
            # Streamed with usage, whether the client streams or not: one translation for both (module doc).
            stream=True, stream_options=StreamOptions(include_usage=True),
        )
        try:
            reject_unsupported(chat)
        except APIError as e:
            raise self.translated(e) from None
        return chat

    def _messages(self) -> list:
        out = []
        if self.req.instructions is not None:
            out.append(SystemMessage(role="system", content=self.req.instructions))
            self.where["messages[0]"] = "instructions"
        for item, source in zip(self.items, self.sources):
            if isinstance(item, FunctionCallItem):
                call = ToolCallIn(id=item.call_id, function=FunctionCallIn(name=item.name, arguments=item.arguments))
                if out and isinstance(out[-1], AssistantMessage):  # a turn's calls (and its text) are one message
                    out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
                else:
                    out.append(AssistantMessage(role="assistant", content=None, tool_calls=[call]))
                self.where[f"messages[{len(out) - 1}].tool_calls[{len(out[-1].tool_calls) - 1}].function"] = source
                continue
            if isinstance(item, FunctionCallOutputItem):
                out.append(ToolMessage(role="tool", tool_call_id=item.call_id, content=parts_text(item.output)))
            else:
                out.append(_ROLES[item.role](role=item.role, content=parts_text(item.content)))
            self.where[f"messages[{len(out) - 1}]"] = source
        return out

    def translated(self, err: APIError) -> APIError:
        """The error with the chat param it names (and quotes) put in the Responses request's terms."""
        param = err.param or ""
        for chat in sorted(self.where, key=len, reverse=True):
            if param == chat or param.startswith((chat + ".", chat + "[")):
                ours = self.where[chat] + param[len(chat):]
                err.message = err.message.replace(f"'{param}'", f"'{ours}'")
                err.param = ours
                break
        return err


class TurnGeneration:
    """The Generation of a turn (the interface app.main.respond and ChatResponder use). With truncation
    'auto' it starts again without the oldest input item while the model server finds the prompt too
    long: each refusal costs the model server a template render and a tokenization, no prefill, and the
    first prompt that fits is the one that runs (nothing fitting is dropped)."""

    def __init__(self, router: Router, turn: Turn, model: str, record: RequestRecord | None):
        self.router, self.turn, self.model, self.record = router, turn, model, record
        self.gen: Generation | None = None

    async def start(self) -> None:
        while True:
            self.gen = Generation(self.router, [build_request(self.turn.chat)], self.model, self.record)
            try:
                return await self.gen.start()
            except ContextLengthExceeded as e:
                if self.turn.req.truncation != "auto" or not self.turn.drop_oldest():
                    raise self.turn.translated(e) from None
            except APIError as e:
                raise self.turn.translated(e) from None

    def events(self):
        return self.gen.events()

    def usage(self, completion_tokens: int):
        return self.gen.usage(completion_tokens)

    def cancel(self) -> None:
        if self.gen is not None:
            self.gen.cancel()

    @property
    def finished(self) -> bool:
        return self.gen is None or self.gen.finished


def _logprobs(entries, in_part: bool) -> list:
    """Chat logprobs as an output_text part's (with bytes) or a text delta event's (without)."""
    mod = response_output_text if in_part else response_text_delta_event
    with_bytes = (lambda x: {"bytes": x.bytes}) if in_part else (lambda x: {})
    return [mod.Logprob(token=e.token, logprob=e.logprob, **with_bytes(e), top_logprobs=[
        mod.LogprobTopLogprob(token=t.token, logprob=t.logprob, **with_bytes(t)) for t in e.top_logprobs])
        for e in entries or []]


def _text(text: str, logprobs: list) -> oai.ResponseOutputText:
    return oai.ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=logprobs)


def _failure_code(err: APIError) -> str:
    if isinstance(err, TooManyRequests):
        return "rate_limit_exceeded"
    return "invalid_prompt" if err.status == 400 else "server_error"


class ResponsesResponder:
    def __init__(self, turn: Turn, model: str, gen: TurnGeneration, store: ResponseStore):
        self.turn, self.req, self.model, self.gen, self.store = turn, turn.req, model, gen, store
        self.id = "resp_" + new_request_id()
        self.created = int(time.time())
        self.output: list = []  # the items done so far
        self.sequence = 0
        self.final: oai.Response | None = None

    def response(self, status: str, **fields) -> oai.Response:
        """The response object with what the request set echoed, as OpenAI's has it."""
        req, fmt = self.req, (self.req.text.format if self.req.text else None)
        if fmt is None or fmt.type == "text":
            text_format = ResponseFormatText(type="text")
        elif fmt.type == "json_object":
            text_format = ResponseFormatJSONObject(type="json_object")
        else:
            given = {k: v for k, v in (("description", fmt.description), ("strict", fmt.strict)) if v is not None}
            text_format = oai.ResponseFormatTextJSONSchemaConfig(type="json_schema", name=fmt.name, schema=fmt.schema_,
                                                                 **given)  # a string or absent, in the spec
        choice = req.tool_choice or "auto"
        return oai.Response(
            id=self.id, object="response", created_at=self.created, status=status, model=self.model,
            output=list(self.output), error=fields.get("error"), incomplete_details=fields.get("incomplete"),
            **({"usage": fields["usage"]} if "usage" in fields else {}),  # absent until the end
            completed_at=int(time.time()) if status == "completed" else None,
            instructions=req.instructions, metadata=req.metadata or {},
            **({"user": req.user} if req.user is not None else {}),  # a string or absent, in the spec
            # strict echoed true unless the client said false: the tool grammar holds every call to its schema.
            tools=[oai.FunctionTool(type="function", name=t.name, description=t.description, parameters=t.parameters,
                                    strict=t.strict is not False) for t in req.function_tools()],
            tool_choice=choice if isinstance(choice, str) else oai.ToolChoiceFunction(type="function", name=choice.name),
            parallel_tool_calls=req.parallel_tool_calls is not False,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_logprobs=req.top_logprobs or 0,
            max_output_tokens=req.max_output_tokens, previous_response_id=req.previous_response_id,
            text=oai.ResponseTextConfig(format=text_format), truncation=req.truncation or "disabled",
            store=req.store is not False, background=False, service_tier="default",
        )

    def _event(self, cls, **fields) -> BaseModel:
        """An event of class `cls`, its `type` the one its class allows, numbered in sending order."""
        self.sequence += 1
        return cls(type=cls.model_fields["type"].annotation.__args__[0], sequence_number=self.sequence - 1, **fields)

    async def full(self) -> oai.Response:
        async for _ in self.events():
            pass
        return self.final

    async def stream(self) -> AsyncIterator[dict]:
        """SSE events as OpenAI sends them: `event: <type>` and the event's JSON. An error once the stream
        has begun is an `error` event, then `response.failed` with the output so far."""
        try:
            async for ev in self.events():
                yield named_sse(ev)
        except APIError as e:
            yield named_sse(self._event(oai.ResponseErrorEvent, code=e.code or e.type, message=e.message, param=e.param))
            failed = self.response("failed", error=oai.ResponseError(code=_failure_code(e), message=e.message))
            yield named_sse(self._event(oai.ResponseFailedEvent, response=failed))

    async def events(self) -> AsyncIterator[BaseModel]:
        """The stream's events, from response.created to response.completed (or .incomplete); the final
        response is kept (`final`) and, with `store`, stored."""
        yield self._event(oai.ResponseCreatedEvent, response=self.response("in_progress"))
        yield self._event(oai.ResponseInProgressEvent, response=self.response("in_progress"))
        message: oai.ResponseOutputMessage | None = None  # the message item open
        finish, usage = "stop", None
        async for data in ChatResponder(self.turn.chat, self.model, self.gen).stream():
            if data == "[DONE]":
                break
            # The chat responder's chunks, parsed back: it is the one reader of tool replies (and of
            # finish reasons) for both APIs.
            chunk = ChatCompletionChunk.model_validate_json(data)
            usage = chunk.usage or usage
            for choice in chunk.choices:
                delta, finish = choice.delta, choice.finish_reason or finish
                if delta.content is not None:
                    if message is None:
                        message = oai.ResponseOutputMessage(id="msg_" + new_request_id(), type="message", role="assistant",
                                                            status="in_progress", content=[])
                        for ev in self._open(message, _text("", [])):
                            yield ev
                    if delta.content:
                        lp = choice.logprobs.content if choice.logprobs else None
                        message.content[0].text += delta.content
                        message.content[0].logprobs += _logprobs(lp, True)
                        yield self._event(oai.ResponseTextDeltaEvent, item_id=message.id, output_index=len(self.output),
                                          content_index=0, delta=delta.content, logprobs=_logprobs(lp, False))
                for call in delta.tool_calls or []:
                    if message is not None:
                        for ev in self._close(message, "completed"):
                            yield ev
                        message = None
                    for ev in self._call(call.id, call.function.name, call.function.arguments):
                        yield ev
        incomplete = finish == "length"
        if message is not None:
            for ev in self._close(message, "incomplete" if incomplete else "completed"):
                yield ev
        u = usage  # the chat request asks for the usage chunk (include_usage)
        self.final = self.response(
            "incomplete" if incomplete else "completed",
            incomplete=oai.response.IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            usage=oai.ResponseUsage(
                input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                # The protocol says what the prompt cache served, not what it kept; no reasoning tokens.
                input_tokens_details=oai.response_usage.InputTokensDetails(
                    cached_tokens=u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0,
                    cache_write_tokens=0),
                output_tokens_details=oai.response_usage.OutputTokensDetails(reasoning_tokens=0)),
        )
        if self.req.store is not False:
            self.store.put(self.final.model_dump(mode="json", by_alias=True, exclude_unset=True), self.turn.conversation())
        done = oai.ResponseIncompleteEvent if incomplete else oai.ResponseCompletedEvent
        yield self._event(done, response=self.final)

    def _open(self, message: oai.ResponseOutputMessage, part: oai.ResponseOutputText):
        index = len(self.output)
        yield self._event(oai.ResponseOutputItemAddedEvent, output_index=index, item=message.model_copy(deep=True))
        message.content.append(part)
        yield self._event(oai.ResponseContentPartAddedEvent, item_id=message.id, output_index=index, content_index=0,
                          part=part.model_copy(deep=True))

    def _close(self, message: oai.ResponseOutputMessage, status: str):
        index, part = len(self.output), message.content[0]
        yield self._event(oai.ResponseTextDoneEvent, item_id=message.id, output_index=index, content_index=0,
                          text=part.text, logprobs=[])
        yield self._event(oai.ResponseContentPartDoneEvent, item_id=message.id, output_index=index, content_index=0,
                          part=part)
        message.status = status
        self.output.append(message)
        yield self._event(oai.ResponseOutputItemDoneEvent, output_index=index, item=message)

    def _call(self, call_id: str, name: str, arguments: str):
        """A function call item's events; the chat responder hands out each call whole."""
        index = len(self.output)
        item = oai.ResponseFunctionToolCall(id="fc_" + new_request_id(), type="function_call", call_id=call_id,
                                            name=name, arguments="", status="in_progress")
        yield self._event(oai.ResponseOutputItemAddedEvent, output_index=index, item=item.model_copy())
        yield self._event(oai.ResponseFunctionCallArgumentsDeltaEvent, item_id=item.id, output_index=index, delta=arguments)
        yield self._event(oai.ResponseFunctionCallArgumentsDoneEvent, item_id=item.id, output_index=index, name=name,
                          arguments=arguments)
        item.arguments, item.status = arguments, "completed"
        self.output.append(item)
        yield self._event(oai.ResponseOutputItemDoneEvent, output_index=index, item=item)


