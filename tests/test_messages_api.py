"""/v1/messages and /v1/messages/count_tokens against a model server mocked at the internal protocol
(tests/test_api_mocked.py's `api`): the translation onto chat (what reaches the model server is what
the equivalent chat request sends), the Message and its stop reasons and usage, the stream's event
order, Anthropic's error envelope, and keys in x-api-key."""

from __future__ import annotations

import json

import httpx
import pytest
import respx
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from app.backend_client import BackendClient
from app.config import AppSettings
from app.main import create_app
from common.protocol import DeltaEvent, DoneEvent, ErrorEvent, GenerateBatch, PromptEvent
from tests.test_api_mocked import (  # noqa: F401 (api: a fixture)
    BACKEND,
    INFO,
    MODEL,
    TOOL,
    api,
    fake_generate,
    named_sse_events,
    sent_requests,
)

WEATHER = {"name": "get_weather", "description": "Weather by city", "input_schema": TOOL["function"]["parameters"],
           "cache_control": {"type": "ephemeral"}}
STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)


def sse(body: str) -> list[dict]:
    """The stream's named events, each (but ping and error, which the SDK handles itself) one of the SDK's types."""
    events = named_sse_events(body)
    for event in events:
        if event["type"] not in ("ping", "error"):
            STREAM_EVENT.validate_python(event)
    return events


async def create(api, **body) -> dict:
    r = await api.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, **body})
    assert r.status_code == 200, r.text
    Message.model_validate(r.json())
    return r.json()


async def stream(api, **body) -> list[dict]:
    r = await api.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "stream": True, **body})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    return sse(r.text)


def assert_anthropic_error(r: httpx.Response, status: int, kind: str, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind
    assert all(w in body["error"]["message"] for w in words), body["error"]["message"]


def generate_with(reply: list[str], finish: str = "stop", stop_sequence: str | None = None, error: str | None = None):
    """A model server that writes `reply` and ends with `finish` (and `stop_sequence`), or fails mid-way."""
    def generate(request: httpx.Request) -> httpx.Response:
        lines = []
        for r in GenerateBatch.model_validate_json(request.content).requests:
            lines += [PromptEvent(id=r.id, prompt_tokens=4), *(DeltaEvent(id=r.id, index=0, text=t, token_ids=[7]) for t in reply)]
            lines.append(ErrorEvent(id=r.id, message=error, code="internal") if error else
                         DoneEvent(id=r.id, index=0, finish_reason=finish, completion_tokens=len(reply), stop_sequence=stop_sequence))
        return httpx.Response(200, content="".join(e.model_dump_json() + "\n" for e in lines).encode())
    return generate


# --- the translation: what reaches the model server is what chat sends for the same conversation ---

CONVERSATION = {
    "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
               {"type": "text", "text": "Answer in English."}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "call the tool", "signature": "x"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "And Oslo?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such city", "is_error": True}]},
    ],
}
CHAT_EQUIVALENT = [
    {"role": "system", "content": "You are terse.\n\nAnswer in English."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Checking.",
     "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
    {"role": "user", "content": "And Oslo?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
]


@pytest.mark.parametrize("choice,chat_choice", [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "any", "disable_parallel_tool_use": True}, "required"),
])
async def test_a_conversation_reaches_the_model_server_as_its_chat_equivalent(api, choice, chat_choice):
    await create(api, **CONVERSATION, tools=[WEATHER], tool_choice=choice, max_tokens=9, stop_sequences=["END"],
                 temperature=0.5, top_p=0.9, top_k=40, metadata={"user_id": "u1"}, thinking={"type": "enabled", "budget_tokens": 1024})
    [sent] = sent_requests(api)
    chat_tool = {"type": "function", "function": {k: TOOL["function"][k] for k in ("name", "parameters")} | {"description": "Weather by city"}}
    r = await api.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT_EQUIVALENT, "tools": [chat_tool], "tool_choice": chat_choice, "max_tokens": 9,
        "stop": ["END"], "temperature": 0.5, "top_p": 0.9, "parallel_tool_calls": not choice.get("disable_parallel_tool_use")})
    assert r.status_code == 200, r.text
    [chat] = sent_requests(api)
    ignored = {"id", "request_id", "top_k"}
    assert sent.model_dump(exclude=ignored) == chat.model_dump(exclude=ignored)
    assert sent.top_k == 40 and chat.top_k == 0  # chat has no top_k: it travels beside the chat request
    assert [m.name for m in sent.messages if m.role == "tool"] == ["get_weather", "get_weather"]


async def test_a_string_content_and_no_system(api):
    await create(api, messages=[{"role": "user", "content": "hi"}])
    [sent] = sent_requests(api)
    assert [(m.role, m.content) for m in sent.messages] == [("user", "hi")]
    assert sent.temperature == 1.0 and sent.top_p == 1.0 and sent.top_k == 0 and sent.max_tokens == 5 and not sent.tools


async def test_structured_outputs_are_chat_response_format(api):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    await create(api, messages=[{"role": "user", "content": "hi"}], output_config={"format": {"type": "json_schema", "schema": schema}})
    [sent] = sent_requests(api)
    assert sent.grammar.type == "json_schema" and sent.grammar.value == schema and sent.grammar.param == "response_format"


async def test_a_request_as_claude_code_sends_it_is_served(api):
    """Beta headers and query, cache_control everywhere, thinking, effort, context management: accepted, and
    what this server cannot do with them changes nothing it answers."""
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
               "x-api-key": "unused", "x-app": "cli"}
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "metadata": {"user_id": "user_abc_session_1"},
            "system": CONVERSATION["system"], "tools": [WEATHER], "cache_control": {"type": "ephemeral"},
            "thinking": {"type": "enabled", "budget_tokens": 31999}, "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>Be careful.</system-reminder>"},
                {"type": "text", "text": "two calls", "cache_control": {"type": "ephemeral"}}]}]}
    r = await api.post("/v1/messages?beta=true", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert sse(r.text)[-2]["delta"]["stop_reason"] == "tool_use"
    [sent] = sent_requests(api)
    assert sent.messages[-1].content == "<system-reminder>Be careful.</system-reminder>\n\ntwo calls" and sent.grammar.param == "tools"


# --- the Message ---

async def test_message_shape_usage_and_max_tokens(api):
    body = await create(api, messages=[{"role": "user", "content": "again hi"}])
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == MODEL and body["content"] == [{"type": "text", "text": "Hello world"}]
    assert body["stop_reason"] == "max_tokens" and body["stop_sequence"] is None  # the mock ends at "length"
    # Anthropic's input_tokens leaves the cached ones out: 3 prompt tokens, 2 from the cache.
    assert body["usage"] == {"input_tokens": 1, "output_tokens": 2, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 0}


async def test_tool_calls_are_tool_use_blocks(api):
    body = await create(api, messages=[{"role": "user", "content": "two calls"}], tools=[WEATHER], tool_choice={"type": "any"})
    assert body["stop_reason"] == "tool_use"
    assert [(b["type"], b["name"], b["input"]) for b in body["content"]] == [
        ("tool_use", "get_weather", {"city": "Paris"}), ("tool_use", "get_weather", {"city": "Oslo"})]
    assert all(b["id"].startswith("toolu_") for b in body["content"]) and body["content"][0]["id"] != body["content"][1]["id"]


@pytest.mark.parametrize("matched,stops,reason", [
    ("END", ["END", "STOP"], "stop_sequence"),
    ("<end_of_turn>", ["END"], "end_turn"),  # the chat template's stop string: the model's end of turn
    (None, ["END"], "end_turn"),
])
async def test_stop_reason_names_the_stop_sequence_that_ended_the_reply(api, matched, stops, reason):
    api.mock.routes["generate"].side_effect = generate_with(["Done"], "stop", matched)
    body = await create(api, messages=[{"role": "user", "content": "hi"}], stop_sequences=stops)
    assert (body["stop_reason"], body["stop_sequence"]) == (reason, matched if reason == "stop_sequence" else None)
    events = await stream(api, messages=[{"role": "user", "content": "hi"}], stop_sequences=stops)
    assert events[-2]["delta"] == {"stop_reason": reason, "stop_sequence": matched if reason == "stop_sequence" else None}


# --- the stream ---

async def test_text_stream_event_order(api):
    events = await stream(api, messages=[{"role": "user", "content": "again hi"}])
    assert [e["type"] for e in events] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                           "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] == 1
    assert events[2]["content_block"] == {"type": "text", "text": ""}
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == "Hello world"
    assert events[-2]["usage"]["output_tokens"] == 2 and events[-2]["delta"]["stop_reason"] == "max_tokens"


async def test_tool_stream_one_block_per_call(api):
    events = await stream(api, messages=[{"role": "user", "content": "two calls"}], tools=[WEATHER])
    blocks = [e for e in events if e["type"].startswith("content_block")]
    assert [(e["type"], e["index"]) for e in blocks] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1)]
    assert blocks[0]["content_block"]["type"] == "tool_use" and blocks[0]["content_block"]["input"] == {}
    assert [json.loads(e["delta"]["partial_json"]) for e in blocks if e["type"] == "content_block_delta"] == [
        {"city": "Paris"}, {"city": "Oslo"}]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


async def test_a_text_reply_under_tools_is_a_text_block(api):
    api.mock.routes["generate"].side_effect = generate_with(['{"content": "It is ', 'sunny."}'])
    body = await create(api, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert body["content"] == [{"type": "text", "text": "It is sunny."}] and body["stop_reason"] == "end_turn"
    events = await stream(api, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert [e["type"] for e in events][2:] == ["content_block_start", "content_block_delta", "content_block_delta",
                                               "content_block_stop", "message_delta", "message_stop"]
    assert "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta") == "It is sunny."


async def test_an_error_mid_stream_is_an_error_event(api):
    api.mock.routes["generate"].side_effect = generate_with(["Hel"], error="the engine failed")
    events = await stream(api, messages=[{"role": "user", "content": "hi"}])
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "the engine failed"}}
    assert "message_stop" not in [e["type"] for e in events]


# --- count_tokens ---

async def test_count_tokens_is_the_rendered_prompt_of_a_generation_of_nothing(api):
    r = await api.post("/v1/messages/count_tokens", json={"model": MODEL, **CONVERSATION, "tools": [WEATHER]})
    assert r.status_code == 200, r.text
    assert MessageTokensCount.model_validate(r.json()).input_tokens == 3  # the mock's prompt event
    [sent] = sent_requests(api)
    assert sent.max_tokens == 0 and [t.name for t in sent.tools] == ["get_weather"] and len(sent.messages) == 7


# --- errors, in Anthropic's envelope ---

@pytest.mark.parametrize("body,status,kind,words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request_error", ["max_tokens"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, 404, "not_found_error", ["no-such-model"]),
    ({"max_tokens": 5, "messages": []}, 400, "invalid_request_error", ["messages"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5}, 400, "invalid_request_error", ["temperature"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     400, "invalid_request_error", ["'image'", "messages[0].content[1]"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "document", "source": {}}]}]}]}, 400, "invalid_request_error", ["'document'", "messages[0].content[0].content[0]"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]},
     400, "invalid_request_error", ["'thinking'", "user message"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}, 400, "invalid_request_error", ["type"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     400, "invalid_request_error", ["web_search_20250305", "tools[0].type"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
     400, "invalid_request_error", ["tools[0].input_schema.type"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": {"type": "tool"}},
     400, "invalid_request_error", ["tool_choice.name"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "any"}},
     400, "invalid_request_error", ["tool_choice", "tools"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]},
     400, "invalid_request_error", ["prefilling", "messages[1]"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "\ud800"}]}, 400, "invalid_request_error", ["messages[0].content"]),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["s"] * 17}, 400, "invalid_request_error",
     ["stop_sequences"]),
])
async def test_bad_requests_get_anthropic_errors_naming_the_problem(api, body, status, kind, words):
    # json.dumps escapes a lone surrogate (httpx's json= cannot encode one).
    r = await api.post("/v1/messages", content=json.dumps({"model": MODEL, **body}), headers={"content-type": "application/json"})
    assert_anthropic_error(r, status, kind, *words)


async def test_other_error_envelopes(api):
    assert_anthropic_error(await api.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"}),
                           400, "invalid_request_error", "JSON")
    assert_anthropic_error(await api.get("/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(await api.post("/v1/messages/nope", json={}), 404, "not_found_error")
    assert (await api.post("/v1/chat/completions", json={"model": MODEL})).json()["error"]["code"] == "missing_required_parameter"


async def test_a_full_model_server_is_overloaded_529(api):
    def busy(request: httpx.Request) -> httpx.Response:
        [r] = GenerateBatch.model_validate_json(request.content).requests
        return httpx.Response(200, content=ErrorEvent(id=r.id, message="at capacity", code="overloaded").model_dump_json().encode())
    api.mock.routes["generate"].side_effect = busy
    r = await api.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert_anthropic_error(r, 529, "overloaded_error", "at capacity")
    assert r.headers["retry-after"] == "1"


async def test_while_draining_the_messages_routes_answer_overloaded(api):
    api.app.state.drain.begin()
    r = await api.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert_anthropic_error(r, 529, "overloaded_error", "shutting down")
    assert r.headers["retry-after"] == "5"
    assert (await api.post("/v1/chat/completions", json={"model": MODEL, "messages": []})).json()["error"]["code"] == "server_shutting_down"


async def test_keys_in_x_api_key_or_authorization():
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.get("/info").respond(200, content=INFO.model_dump_json())
        mock.post("/generate").mock(side_effect=fake_generate)
        app = create_app(AppSettings(backend_url=BACKEND, api_key="sekret", max_wait_ms=0), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
                body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
                assert_anthropic_error(await c.post("/v1/messages", json=body), 401, "authentication_error", "x-api-key")
                assert_anthropic_error(await c.post("/v1/messages", json=body, headers={"x-api-key": "wrong"}), 401, "authentication_error")
                for headers in ({"x-api-key": "sekret", "anthropic-version": "2023-06-01"}, {"Authorization": "Bearer sekret"}):
                    assert (await c.post("/v1/messages", json=body, headers=headers)).status_code == 200
                assert (await c.get("/v1/models", headers={"x-api-key": "sekret"})).status_code == 200  # the same key list


async def test_the_openapi_document_gives_the_messages_routes_anthropic_errors(api):
    doc = (await api.get("/openapi.json")).json()
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = doc["paths"][path]["post"]["responses"]
        assert sorted(responses) == ["200", "400", "401", "404", "529"]
        assert responses["529"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AnthropicErrorResponse"}
