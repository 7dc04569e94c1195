"""Anthropic's Messages API through the official `anthropic` SDK, unchanged, pointed at our base URL (as
Claude Code is with ANTHROPIC_BASE_URL): messages.create, messages.stream (text_stream and the final
message), tools with tool_choice any and a tool_result round trip, count_tokens, stop sequences, the
prompt cache in usage, and errors as the SDK's exception classes. The default model is a tiny base
model: these check shapes and behaviour, not the quality of its answers."""

from __future__ import annotations

import anthropic
import pytest
from anthropic.types import Message, TextBlock, ToolUseBlock
from pydantic import BaseModel, Field

from tests.stop_strings import spanning_stop

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}
# As Claude Code sends it: text blocks with cache_control. Long enough that the prompt cache keeps its
# cells (it reuses prompt chunks of 64 tokens or more).
SYSTEM = [{"type": "text", "text": "You are a weather assistant.", "cache_control": {"type": "ephemeral"}},
          {"type": "text", "text": " ".join(f"Rule {i}: answer briefly and politely." for i in range(30))}]
HELLO = [{"role": "user", "content": "Say hello."}]
# This SDK version has no sampling keyword arguments (newer Claude models fix them); the API still takes them.
GREEDY = {"temperature": 0}


class City(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.fixture(scope="module")
def client(live_stack):
    return anthropic.Anthropic(base_url=live_stack.base_url, api_key="unused", max_retries=0)


def test_create(client, live_stack):
    m = client.messages.create(model=live_stack.model, max_tokens=8, messages=HELLO, extra_body=GREEDY,
                               metadata={"user_id": "u1"})
    assert isinstance(m, Message) and m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == live_stack.model and m.stop_sequence is None
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.input_tokens > 0
    assert (m.stop_reason == "max_tokens") == (m.usage.output_tokens == 8)


def test_stream_is_the_same_reply(client, live_stack):
    kw = dict(model=live_stack.model, max_tokens=12, messages=[{"role": "user", "content": "Count to five."}], extra_body=GREEDY)
    with client.messages.stream(**kw) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    full = client.messages.create(**kw)
    assert "".join(pieces) == final.content[0].text == full.content[0].text and len(pieces) > 1
    assert final.stop_reason == full.stop_reason and final.usage.output_tokens == full.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == full.usage.input_tokens + full.usage.cache_read_input_tokens


def test_stop_sequences(client, live_stack):
    kw = dict(model=live_stack.model, max_tokens=30, messages=[{"role": "user", "content": "Tell me a story."}], extra_body=GREEDY)
    with client.messages.stream(**kw) as stream:
        pieces = list(stream.text_stream)
    stop = spanning_stop(pieces)
    m = client.messages.create(**kw, stop_sequences=["never written", stop])
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", stop)
    assert m.content[0].text == "".join(pieces)[: "".join(pieces).index(stop)]


def test_top_k_one_is_greedy(client, live_stack):
    kw = dict(model=live_stack.model, max_tokens=10, messages=[{"role": "user", "content": "Name a colour."}])
    greedy = client.messages.create(**kw, extra_body=GREEDY).content[0].text
    top_1 = [client.messages.create(**kw, extra_body={"temperature": 1, "top_k": 1}).content[0].text for _ in range(2)]
    assert top_1 == [greedy] * 2


def test_tools_any_and_a_tool_result_round_trip(client, live_stack):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = client.messages.create(model=live_stack.model, max_tokens=40, system=SYSTEM, messages=question,
                               tools=[WEATHER], tool_choice={"type": "any"}, extra_body=GREEDY)
    assert m.stop_reason == "tool_use"
    calls = [b for b in m.content if isinstance(b, ToolUseBlock)]
    assert calls and all(c.name == "get_weather" and c.id.startswith("toolu_") and isinstance(c.input["city"], str) for c in calls)
    # The assistant's turn goes back as the SDK returned it, with one result per call.
    answer = [*question, {"role": "assistant", "content": m.content},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": c.id, "content": "Sunny, 24 C"} for c in calls]}]
    reply = client.messages.create(model=live_stack.model, max_tokens=60, system=SYSTEM, messages=answer, tools=[WEATHER],
                                   extra_body=GREEDY)
    # A reply cut inside its JSON (max_tokens) has no block: no call half made, no JSON passed off as text.
    assert reply.stop_reason in ("end_turn", "tool_use") and reply.content or reply.stop_reason == "max_tokens"
    assert reply.usage.cache_read_input_tokens > 0  # the conversation so far came from the prompt cache
    with client.messages.stream(model=live_stack.model, max_tokens=40, system=SYSTEM, messages=question, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input == calls[0].input  # greedy: the call create made, its input parsed from the deltas


def test_parse_structured_output(client, live_stack):
    m = client.messages.parse(model=live_stack.model, max_tokens=60, output_format=City, extra_body=GREEDY,
                              messages=[{"role": "user", "content": "Where is the Eiffel Tower?"}])
    assert isinstance(m.parsed_output, City) and m.stop_reason == "end_turn"


def test_count_tokens_is_what_create_reads(client, live_stack):
    kw = dict(model=live_stack.model, system=SYSTEM, messages=HELLO, tools=[WEATHER])
    counted = client.messages.count_tokens(**kw).input_tokens
    used = client.messages.create(**kw, max_tokens=4, extra_body=GREEDY).usage
    assert counted > 100 and counted == used.input_tokens + used.cache_read_input_tokens + used.cache_creation_input_tokens
    assert client.messages.count_tokens(model=live_stack.model, messages=HELLO).input_tokens < counted


def test_errors_raise_the_sdk_exception_classes(client, live_stack):
    with pytest.raises(anthropic.BadRequestError) as e:  # the SDK itself insists on max_tokens: send the body raw
        client.post("/v1/messages", body={"model": live_stack.model, "messages": HELLO}, cast_to=Message)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-no-such-model", max_tokens=4, messages=HELLO)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=live_stack.model, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert "'image'" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=live_stack.model, max_tokens=4000, messages=HELLO)  # past the context
    assert "max_tokens" in e.value.message
    assert isinstance(client.messages.create(model=live_stack.model, max_tokens=2, messages=HELLO).content[0], TextBlock)  # still serving
