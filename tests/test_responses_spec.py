"""OpenAI's published spec as the judge of /v1/responses on the live stack (the default model): every
response body against `Response`, every stream event against its member of `ResponseStreamEvent`, errors
against `ErrorResponse` (tests/openai_spec.py; the Judge of tests/test_openai_spec.py). All problems of
a run are reported together."""

from __future__ import annotations

import json

from tests import openai_spec
from tests.test_api_mocked import named_sse_events
from tests.test_openai_spec import judge  # noqa: F401 (fixture)

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
SCHEMA = {"type": "json_schema", "name": "greeting", "strict": True, "schema": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 12}}, "required": ["text"],
    "additionalProperties": False}}


def response(j, **body) -> dict:
    return j.body("POST", "/v1/responses", "Response", json={"model": j.model, **body})


def stream(j, **body) -> list[dict]:
    """The stream's events, each judged by the schema of its type, numbered from 0."""
    r = j.client.post("/v1/responses", json={"model": j.model, "stream": True, **body})
    what = f"POST /v1/responses (stream) {json.dumps(body)[:120]}"
    assert r.status_code == 200, f"{what}: HTTP {r.status_code} {r.text[:300]}"
    events = named_sse_events(r.text)  # `event:` names checked there
    problems = [f"event {n}: sequence_number {e.get('sequence_number')}" for n, e in enumerate(events)
                if e.get("sequence_number") != n]
    for n, event in enumerate(events):
        schema = openai_spec.member_for_type("ResponseStreamEvent", event["type"])
        problems += [f"event {n}: {p}" for p in openai_spec.problems(schema, event)]
    j._note(what, problems)
    return events


def test_every_response_and_event_matches_the_published_spec(judge):
    j = judge
    ask = [{"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]}]
    # bodies: text (cut and not), instructions and sampling, structured output, logprobs, tools, a round trip
    first = response(j, input="Say hello.", instructions="Be brief.", max_output_tokens=4, temperature=0,
                     metadata={"run": "spec"}, user="u")
    response(j, input="Say hello.", max_output_tokens=40, top_p=0.5, truncation="auto")
    response(j, input="Say hello.", text={"format": SCHEMA}, max_output_tokens=40)
    response(j, input="Say hello.", text={"format": {"type": "json_object"}}, max_output_tokens=20)
    response(j, input="Say hello.", include=["message.output_text.logprobs"], top_logprobs=2, max_output_tokens=4)
    for choice in ("auto", "required", {"type": "function", "name": "get_weather"}):
        response(j, input=ask, tools=[WEATHER], tool_choice=choice, max_output_tokens=60)
    called = response(j, input=ask, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_output_tokens=60)
    call = next(o for o in called["output"] if o["type"] == "function_call")
    response(j, input=[*ask, call, {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny"}],
             tools=[WEATHER], max_output_tokens=12)
    response(j, input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny"}],
             previous_response_id=called["id"], tools=[WEATHER], max_output_tokens=12)
    continued = response(j, input="And again?", previous_response_id=first["id"], max_output_tokens=4)
    # streams: text, tools, structured output, logprobs, a continuation
    stream(j, input="Count to three.", max_output_tokens=8)
    stream(j, input=ask, tools=[WEATHER], tool_choice="required", max_output_tokens=60)
    stream(j, input="Say hello.", text={"format": SCHEMA}, max_output_tokens=40)
    stream(j, input="Say hello.", include=["message.output_text.logprobs"], top_logprobs=1, max_output_tokens=4)
    stream(j, input="Once more.", previous_response_id=continued["id"], max_output_tokens=4)
    # stored: GET, DELETE, and the 404 after it
    j.body("GET", f"/v1/responses/{continued['id']}", "Response")
    assert j.client.delete(f"/v1/responses/{first['id']}").json()["deleted"] is True
    j.error("GET", f"/v1/responses/{first['id']}", 404)
    j.error("POST", "/v1/responses", 404, json={"model": j.model, "input": "x", "previous_response_id": first["id"]})
    # refusals
    j.error("POST", "/v1/responses", 400, json={"model": j.model, "input": "x", "tools": [{"type": "web_search"}]})
    j.error("POST", "/v1/responses", 400, json={"model": j.model, "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-1"}]}]})
    j.error("POST", "/v1/responses", 400, json={"model": j.model, "input": "word " * 1500})
    assert j.checked >= 23
    assert not j.found, f"{len(j.found)} of {j.checked} responses break the spec:\n" + "\n".join(j.found)
