"""The Responses API through the clients that speak it, unchanged: the `openai` SDK's `client.responses`
(create, stream, parse, retrieve, delete, previous_response_id) and the OpenAI Agents SDK's Runner on
`OpenAIResponsesModel` pointed at our base URL. The default model is a tiny base model: what it writes
is not smart, so these check shapes, that calls happen when required, that a continued conversation
reuses the prompt cache, and that an agent run executes its tool, not the quality of the answers."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
# Long enough that the prompt cache keeps its cells (it reuses prompt chunks of 64 tokens or more).
INSTRUCTIONS = "You are a weather assistant. " + " ".join(f"Rule {i}: answer briefly and politely." for i in range(30))


class City(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


def test_create(client, live_stack):
    r = client.responses.create(model=live_stack.model, instructions="Be brief.", input="Say hello.",
                                max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == live_stack.model
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    assert r.output_text == r.output[0].content[0].text and r.output_text
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8


def test_stream_events_and_final_response(client, live_stack):
    kw = dict(model=live_stack.model, input="Count to five.", max_output_tokens=12, temperature=0)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    # The SDK's get_final_response() knows only response.completed; a reply cut by max_output_tokens ends,
    # as OpenAI's do, with response.incomplete, which carries the final response all the same.
    final = events[-1].response
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-1] in ("response.completed", "response.incomplete") and "response.output_text.done" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert final.output_text == client.responses.create(**kw).output_text  # greedy: streamed or not, the same


def test_required_tool_call_and_its_result_round_trip(client, live_stack):
    r = client.responses.create(model=live_stack.model, instructions=INSTRUCTIONS, input="Weather in Paris?",
                                tools=[WEATHER], tool_choice="required", max_output_tokens=60)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls and all(c.name == "get_weather" for c in calls)
    assert isinstance(json.loads(calls[0].arguments)["city"], str) and calls[0].call_id
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 21 C"} for c in calls]
    after = client.responses.create(model=live_stack.model, instructions=INSTRUCTIONS, previous_response_id=r.id,
                                    input=results, tools=[WEATHER], max_output_tokens=60)
    assert after.previous_response_id == r.id and after.output
    # the previous turn (instructions, question, calls) is the new prompt's prefix: served by the prompt cache
    assert after.usage.input_tokens > r.usage.input_tokens
    assert after.usage.input_tokens_details.cached_tokens >= 64


def test_streamed_tool_call(client, live_stack):
    with client.responses.stream(model=live_stack.model, input="Weather in Oslo?", tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60) as s:
        events = list(s)
        final = s.get_final_response()  # the call closed its object: completed
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    calls = [o for o in final.output if o.type == "function_call"]
    assert done and [d.arguments for d in done] == [c.arguments for c in calls]
    assert all(json.loads(c.arguments).keys() == {"city"} for c in calls)


def test_parse_with_a_pydantic_model(client, live_stack):
    r = client.responses.parse(model=live_stack.model, input="Paris: the city and its country, as JSON.",
                               text_format=City, max_output_tokens=60)
    assert isinstance(r.output_parsed, City)
    assert r.text.format.type == "json_schema" and r.text.format.name == "City"


def test_retrieve_continue_and_delete(client, live_stack):
    first = client.responses.create(model=live_stack.model, input="My name is Ada.", max_output_tokens=6)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(model=live_stack.model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=6)
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn is in its prompt
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(first.id)
    assert first.id in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=live_stack.model, input="x", previous_response_id=first.id)
    third = client.responses.create(model=live_stack.model, input="Again?", previous_response_id=second.id,
                                    max_output_tokens=4)
    assert third.status in ("completed", "incomplete")  # each stored response holds its whole conversation
    unstored = client.responses.create(model=live_stack.model, input="x", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_what_is_not_supported_is_a_clear_400(client, live_stack):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=live_stack.model, input="x", tools=[{"type": "web_search"}])
    assert e.value.param == "tools[0].type" and "web_search" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=live_stack.model, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}])
    assert e.value.param == "input[0].content[0]" and "input_image" in e.value.message


@pytest.fixture(scope="module")
def agents(live_stack):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    return agents


def weather_agent(agents, live_stack, calls: list, **settings):
    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    model = agents.OpenAIResponsesModel(model=live_stack.model, openai_client=openai.AsyncOpenAI(
        base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0))
    return agents.Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather], model=model,
                        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=60, **settings),
                        tool_use_behavior="stop_on_first_tool")


async def test_agents_runner_executes_a_function_tool(agents, live_stack):
    calls: list[str] = []
    result = await agents.Runner.run(weather_agent(agents, live_stack, calls), "What is the weather in Paris?", max_turns=2)
    assert calls and result.final_output == f"Sunny in {calls[0]}"
    assert any(getattr(item, "type", "") == "tool_call_output_item" for item in result.new_items)


async def test_agents_streamed_run_then_a_model_turn_on_the_tool_result(agents, live_stack):
    calls: list[str] = []
    agent = weather_agent(agents, live_stack, calls).clone(tool_use_behavior="run_llm_again", reset_tool_choice=True)
    # after the tool, tool_choice goes back to auto: the model answers in text or calls again (a base model)
    result = agents.Runner.run_streamed(agent, "What is the weather in Oslo?", max_turns=4)
    kinds, raw = [], []
    try:
        async for event in result.stream_events():
            kinds.append(event.type)
            if event.type == "raw_response_event":
                raw.append(event.data.type)
    except agents.exceptions.MaxTurnsExceeded:
        pass  # the model kept calling: the tool still ran, and each turn completed
    assert calls and "run_item_stream_event" in kinds
    # the Responses stream reached the SDK whole: each model turn ended with response.completed
    assert raw.count("response.completed") >= 2 and "response.function_call_arguments.done" in raw
    assert len(result.raw_responses) >= 2 and all(r.output for r in result.raw_responses)
