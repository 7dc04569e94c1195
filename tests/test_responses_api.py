"""/v1/responses against a model server mocked at the internal protocol (tests/test_api_mocked.py's `api`):
the translation onto chat (what reaches the model server), the response object and the stream's events
(checked against OpenAI's published spec as well), the 400s, and the response store."""

from __future__ import annotations

import json

import httpx
import pytest
from openai.types.responses import Response

from app.responses_store import ResponseStore
from common.protocol import DeltaEvent, ErrorEvent, GenerateBatch, PromptEvent
from tests import openai_spec
from tests.test_api_mocked import MODEL, TOOL, api, assert_error, fake_generate, named_sse_events, sent_requests  # noqa: F401

WEATHER = {"type": "function", **TOOL["function"]}


def spec_problems(events: list[dict]) -> list[str]:
    return [p for e in events for p in openai_spec.problems(openai_spec.member_for_type("ResponseStreamEvent", e["type"]), e)]


async def create(api, **body) -> dict:
    r = await api.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    assert openai_spec.problems("Response", r.json()) == []
    Response.model_validate(r.json())
    return r.json()


async def stream(api, **body) -> list[dict]:
    r = await api.post("/v1/responses", json={"model": MODEL, "stream": True, **body})
    assert r.status_code == 200, r.text
    events = named_sse_events(r.text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert spec_problems(events) == []
    return events


async def test_text_response_shape_usage_and_echoed_fields(api):
    body = await create(api, input="hi", instructions="Be brief.", temperature=0.5, top_p=0.9, max_output_tokens=7,
                        metadata={"k": "v"}, user="u1")
    assert body["object"] == "response" and body["id"].startswith("resp_")
    # The mock stops at "length": incomplete, as OpenAI reports a reply cut by max_output_tokens.
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = body["output"]
    assert message["type"] == "message" and message["status"] == "incomplete"
    assert message["content"] == [{"type": "output_text", "text": "Hello world", "annotations": [], "logprobs": []}]
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5,
                             "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                             "output_tokens_details": {"reasoning_tokens": 0}}
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (0.5, 0.9, 7)
    assert (body["metadata"], body["user"], body["instructions"], body["store"]) == ({"k": "v"}, "u1", "Be brief.", True)
    [sent] = sent_requests(api)
    assert [(m.role, m.content) for m in sent.messages] == [("system", "Be brief."), ("user", "hi")]
    assert (sent.temperature, sent.top_p, sent.max_tokens, sent.n) == (0.5, 0.9, 7, 1)


async def test_cached_tokens_are_reported(api):
    body = await create(api, input="again, please")
    assert body["usage"]["input_tokens_details"]["cached_tokens"] == 2


async def test_stream_has_the_official_event_sequence_and_the_final_response(api):
    events = await stream(api, input="hi")
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello world"
    final = events[-1]["response"]
    assert final["output"] == [events[-2]["item"]] and final["output"][0]["content"][0]["text"] == "Hello world"
    assert final["usage"]["output_tokens"] == 2
    assert {e["item_id"] for e in events if "item_id" in e} == {final["output"][0]["id"]}


async def test_function_calls_streamed_and_not(api):
    body = await create(api, input="two calls", tools=[WEATHER], tool_choice="required")
    assert body["status"] == "completed"
    calls = body["output"]
    assert [(c["type"], c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("function_call", "get_weather", {"city": "Paris"}), ("function_call", "get_weather", {"city": "Oslo"})]
    assert all(c["call_id"].startswith("call_") and c["id"].startswith("fc_") and c["status"] == "completed" for c in calls)
    assert body["tools"] == [{**WEATHER, "description": None, "strict": True}] and body["tool_choice"] == "required"
    [sent] = sent_requests(api)
    assert [t.name for t in sent.tools] == ["get_weather"] and sent.grammar.param == "tools"
    events = await stream(api, input="two calls", tools=[WEATHER])
    kinds = [e["type"] for e in events[2:-1]]
    assert kinds == ["response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done"] * 2
    assert events[-1]["type"] == "response.completed"
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert all(a["arguments"] == "" and a["status"] == "in_progress" for a in added)
    assert [c["arguments"] for c in events[-1]["response"]["output"]] == [c["arguments"] for c in calls]


async def test_named_tool_choice_and_no_parallel_calls(api):
    body = await create(api, input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                        parallel_tool_calls=False)
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"} and body["parallel_tool_calls"] is False
    schema = json.dumps(sent_requests(api)[0].grammar.value)
    assert "get_weather" in schema and '"maxItems": 1' in schema


async def test_input_items_become_the_chat_messages(api):
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                                        {"type": "input_text", "text": "Paris and Oslo?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "Rain"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny and rain."}]},
        {"role": "user", "content": "Thanks"},
    ]
    await create(api, input=items, tools=[WEATHER])
    messages = sent_requests(api)[0].messages
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Use tools."), ("user", "Weather in Paris and Oslo?"), ("assistant", ""), ("tool", "Sunny"),
        ("tool", "Rain"), ("assistant", "Sunny and rain."), ("user", "Thanks")]
    # consecutive calls are one assistant turn, as the model wrote them; results name their function
    assert [(c.id, c.arguments) for c in messages[2].tool_calls] == [("c1", '{"city": "Paris"}'), ("c2", '{"city": "Oslo"}')]
    assert [(m.tool_call_id, m.name) for m in messages[3:5]] == [("c1", "get_weather"), ("c2", "get_weather")]


async def test_text_format_json_schema_is_the_grammar_and_echoed(api):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    body = await create(api, input="x", text={"format": fmt})
    assert body["text"]["format"] == fmt
    grammar = sent_requests(api)[0].grammar
    assert (grammar.type, grammar.value, grammar.param) == ("json_schema", schema, "response_format")
    body = await create(api, input="x", text={"format": {"type": "json_object"}})
    assert body["text"]["format"] == {"type": "json_object"} and sent_requests(api)[0].grammar.value == {"type": "object"}


async def test_logprobs_when_included(api):
    body = await create(api, input="x", include=["message.output_text.logprobs"], top_logprobs=2)
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert [lp["token"] for lp in logprobs] == ["Hello", " world"] and len(logprobs[0]["top_logprobs"]) == 2
    assert sent_requests(api)[0].logprobs == 2
    events = await stream(api, input="x", include=["message.output_text.logprobs"])
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [d["logprobs"][0]["token"] for d in deltas] == ["Hello", " world"]


async def test_what_the_agents_sdk_sends_without_tools_is_accepted(api):
    body = await create(api, input=[{"role": "user", "content": "hi"}], tools=[], tool_choice="auto", include=[],
                        truncation="disabled", store=False)
    assert body["tools"] == [] and body["store"] is False


@pytest.mark.parametrize("body, code, param", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "unsupported_parameter", "tools[0].type"),
    ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "unsupported_parameter", "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]}]},
     "unsupported_parameter", "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "unsupported_parameter",
     "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "unsupported_parameter", "input[0].type"),
    ({"input": [{"content": "no role"}]}, "invalid_value", "input[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "invalid_value", "input[0].role"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "unsupported_parameter", "tool_choice.type"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, None, "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, None, "tool_choice"),
    ({"input": "x", "tools": [WEATHER, WEATHER]}, None, "tools"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "missing_required_parameter",
     "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"$ref": "#/$defs/X"}}}}, None,
     "text.format"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": {"$ref": "#/nope"}}]}, None, "tools[0].parameters"),
    ({"input": "x", "tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "unsupported_parameter", "text.format"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, None, "input[0].arguments"),
    ({"input": "x", "background": True}, "unsupported_parameter", "background"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "unsupported_parameter", "reasoning"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "invalid_value", "metadata"),
    ({"input": "x", "temperature": 3}, "invalid_value", "temperature"),
    ({"input": "x", "max_output_tokens": -1}, "invalid_value", "max_output_tokens"),
    ({}, "missing_required_parameter", "input"),
    ({"input": []}, None, "input"),
    ({"input": "\ud800"}, None, "input"),
])
async def test_what_cannot_be_honoured_is_a_400_naming_it(api, body, code, param):
    # sent as ASCII JSON: a lone surrogate travels as its \\u escape
    r = await api.post("/v1/responses", content=json.dumps({"model": MODEL, **body}), headers={"content-type": "application/json"})
    assert_error(r, 400, code, param)


@pytest.mark.parametrize("body, kind", [
    ({"tools": [{"type": "computer_use_preview"}]}, "computer_use_preview"),
    ({"tools": [{"type": "mcp", "server_label": "s"}]}, "mcp"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]}]}, "input_image"),
    ({"input": [{"type": "web_search_call", "id": "w"}]}, "web_search_call"),
])
async def test_refusals_name_the_kind_refused(api, body, kind):
    r = await api.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
    assert_error(r, 400, "unsupported_parameter")
    assert f"'{kind}' are not supported" in r.json()["error"]["message"]


async def test_unknown_model(api):
    assert_error(await api.post("/v1/responses", json={"model": "nope", "input": "x"}), 404, "model_not_found", "model")


def overflow_past(n: int):
    """A model server whose context holds at most `n` messages."""

    def generate(request: httpx.Request) -> httpx.Response:
        r = GenerateBatch.model_validate_json(request.content).requests[0]
        if len(r.messages) > n:
            line = ErrorEvent(id=r.id, message="This model's maximum context length is 128 tokens.",
                              code="context_length_exceeded", param="messages")
            return httpx.Response(200, content=line.model_dump_json() + "\n")
        return fake_generate(request)

    return generate


async def test_truncation_auto_drops_the_oldest_items_until_the_prompt_fits(api):
    api.mock.routes["generate"].side_effect = overflow_past(3)
    items = [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
             {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
    r = await api.post("/v1/responses", json={"model": MODEL, "input": items, "instructions": "sys", "tools": [WEATHER]})
    assert_error(r, 400, "context_length_exceeded", "input")  # truncation disabled (the default): the error
    body = await create(api, input=items, instructions="sys", tools=[WEATHER], truncation="auto")
    assert body["truncation"] == "auto"
    # the call and its (then orphaned) result went first; instructions stay
    assert [m.content for m in sent_requests(api)[0].messages] == ["sys", "two", "three"]
    api.mock.routes["generate"].side_effect = overflow_past(1)
    r = await api.post("/v1/responses", json={"model": MODEL, "input": "x", "instructions": "sys", "truncation": "auto"})
    assert_error(r, 400, "context_length_exceeded", "input")  # nothing left to drop


async def test_an_error_after_the_stream_began_is_an_error_event_then_response_failed(api):
    def generate(request: httpx.Request) -> httpx.Response:
        rid = GenerateBatch.model_validate_json(request.content).requests[0].id
        lines = [PromptEvent(id=rid, prompt_tokens=3), DeltaEvent(id=rid, index=0, text="Hel", token_ids=[1]),
                 ErrorEvent(id=rid, message="The engine failed.", code="internal")]
        return httpx.Response(200, content="".join(e.model_dump_json() + "\n" for e in lines))

    api.mock.routes["generate"].side_effect = generate
    events = await stream(api, input="x")
    assert [e["type"] for e in events[-3:]] == ["response.output_text.delta", "error", "response.failed"]
    assert events[-2]["message"] == "The engine failed." and events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "The engine failed."}
    assert (await api.get(f"/v1/responses/{events[0]['response']['id']}")).status_code == 404  # not stored


async def test_stored_responses_get_delete_and_continue(api):
    first = await create(api, input=[{"role": "user", "content": "hi"}], instructions="old instructions")
    got = await api.get(f"/v1/responses/{first['id']}")
    assert got.status_code == 200 and got.json() == first
    second = await create(api, input="and then?", instructions="new", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"]
    # instructions are not carried over (as OpenAI): the previous turn's items, its reply, the new input
    assert [(m.role, m.content) for m in sent_requests(api)[0].messages] == [
        ("system", "new"), ("user", "hi"), ("assistant", "Hello world"), ("user", "and then?")]
    third = await create(api, input="more", previous_response_id=second["id"])
    assert [m.content for m in sent_requests(api)[0].messages] == ["hi", "Hello world", "and then?", "Hello world", "more"]
    streamed = await stream(api, input="x", previous_response_id=third["id"])
    assert (await api.get(f"/v1/responses/{streamed[-1]['response']['id']}")).json() == streamed[-1]["response"]
    deleted = await api.delete(f"/v1/responses/{first['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
    for r in (await api.get(f"/v1/responses/{first['id']}"), await api.delete(f"/v1/responses/{first['id']}")):
        assert_error(r, 404, "not_found", "response_id")
        assert first["id"] in r.json()["error"]["message"]
    # a continuation never needed the deleted one: each stored entry holds its whole conversation
    await create(api, input="still", previous_response_id=second["id"])
    r = await api.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": first["id"]})
    assert_error(r, 404, "not_found", "previous_response_id")
    unstored = await create(api, input="x", store=False)
    assert_error(await api.get(f"/v1/responses/{unstored['id']}"), 404, "not_found")


def entry(i: int, text: str = "x") -> tuple[dict, list[dict]]:
    return {"id": f"resp_{i}", "output": [{"type": "message", "role": "assistant", "content": text}]}, \
        [{"type": "message", "role": "user", "content": f"q{i}"}]


def test_store_evicts_the_least_recently_used_past_its_entry_cap():
    store = ResponseStore(max_entries=2, max_bytes=10**6)
    store.put(*entry(1))
    store.put(*entry(2))
    store.response("resp_1")  # a use: resp_2 is now the least recent
    store.put(*entry(3))
    assert len(store) == 2
    with pytest.raises(Exception) as e:
        store.response("resp_2", "previous_response_id")
    assert e.value.status == 404 and e.value.param == "previous_response_id" and "resp_2" in e.value.message
    assert store.continuation("resp_1") == [entry(1)[1][0], entry(1)[0]["output"][0]]


def test_store_evicts_past_its_byte_cap_and_skips_what_never_fits():
    one = sum(len(json.dumps(part)) for part in entry(1))
    store = ResponseStore(max_entries=100, max_bytes=3 * one + 1)
    for i in range(1, 5):
        store.put(*entry(i))
    assert len(store) == 3 and store.bytes <= 3 * one + 1
    with pytest.raises(Exception):
        store.response("resp_1")
    store.put(*entry(9, "x" * (4 * one)))  # larger than the whole store: not kept, nothing evicted for it
    assert len(store) == 3
    with pytest.raises(Exception):
        store.response("resp_9")
    store.put(*entry(4, "longer"))  # stored again under the same id: replaced, bytes recounted, resp_2 out
    assert len(store) == 2 and json.loads(store.response("resp_4"))["output"][0]["content"] == "longer"
    assert store.bytes == sum(len(json.dumps(p)) for p in (*entry(3), *entry(4, "longer")))
    off = ResponseStore(max_entries=0, max_bytes=10**6)
    off.put(*entry(1))
    assert len(off) == 0
