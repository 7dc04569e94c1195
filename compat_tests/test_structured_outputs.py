"""Structured outputs and tool calling through the clients people use them with: the OpenAI SDK
(`.parse()`, json_object, json_schema, tools with every tool_choice, streamed tool calls, a tool
result round trip), LangChain (`with_structured_output`, `bind_tools`, a tool loop) and LlamaIndex
(`chat_with_tools`, `structured_predict`). The default model is a small base model: what it writes
is not smart, but every JSON must follow its schema, which is what the grammar guarantees."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=130)


class City(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Shipment(BaseModel):
    """Ship an item to an address."""

    item: str = Field(max_length=24)
    to: Address  # a nested model: Pydantic writes it as $defs/Address and a $ref


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}}, "required": ["zone"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "system", "content": "You answer with tool calls when a tool helps."},
       {"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


def check_calls(calls) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


# --- OpenAI SDK -----------------------------------------------------------------------------------
def test_sdk_parse_with_a_pydantic_model(client, live_stack):
    r = client.chat.completions.parse(model=live_stack.model, response_format=Person, temperature=0, max_tokens=80,
                                      messages=[{"role": "user", "content": "Invent a person: a name and an age."}])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Person)
    jsonschema.validate(json.loads(msg.content), Person.model_json_schema())


def test_sdk_json_object(client, live_stack):
    r = client.chat.completions.create(model=live_stack.model, response_format={"type": "json_object"}, temperature=0,
                                       max_tokens=120, messages=[{"role": "user", "content": "Describe a cat as JSON."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a prefix of a JSON object
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_sdk_json_schema_streamed_with_n_2(client, live_stack):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True}}
    kw = dict(model=live_stack.model, response_format=fmt, n=2, seed=7, temperature=0.8, max_tokens=60,
              messages=[{"role": "user", "content": "Name a city and its country."}])
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), City.model_json_schema())
    full = client.chat.completions.create(**kw)  # seeded: the stream and the full answer agree
    assert [c.message.content for c in full.choices] == [texts[0], texts[1]]


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "get_time"}}])
def test_sdk_tools_with_each_tool_choice(client, live_stack, choice):
    # One call per reply: a 270M base model given parallel calls repeats them (see the next test).
    r = client.chat.completions.create(model=live_stack.model, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       parallel_tool_calls=False, temperature=0, max_tokens=120)
    c = r.choices[0]
    if choice == "auto" and not c.message.tool_calls:
        assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
        return
    assert c.finish_reason == "tool_calls" and c.message.content is None
    check_calls(c.message.tool_calls)
    if isinstance(choice, dict):
        assert [t.function.name for t in c.message.tool_calls] == ["get_time"]


def test_sdk_parallel_tool_calls_are_capped(client, live_stack):
    from common.tool_format import MAX_PARALLEL_CALLS

    r = client.chat.completions.create(model=live_stack.model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0, max_tokens=300)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and 1 <= len(c.message.tool_calls) <= MAX_PARALLEL_CALLS
    check_calls(c.message.tool_calls)


CITY_TOOL = {"type": "function", "function": {  # the tool of the report: get_weather(city)
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def streamed_calls(client, **kw) -> tuple[list[tuple[str, str]], str]:
    """The calls the SDK accumulates from a raw stream, and its finish_reason; each call's name must
    come once, in the first delta of its index."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.function.name, "the first delta of a call has its id and name"
                    calls[tc.index] = [tc.function.name, ""]
                else:
                    assert not tc.function.name, "a call's name comes once"
                calls[tc.index][1] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("parallel", [None, False])  # None: OpenAI's default, true
@pytest.mark.parametrize("choice", ["required", "auto"])
def test_sdk_tool_calls_are_complete_distinct_and_parallel_only_when_allowed(client, live_stack, choice, parallel):
    # As a new user would: one tool, default temperature and max_tokens; sampled, over several seeds
    # (on some of them the model used to repeat a call until max_tokens and cut the last one).
    for seed in range(3):
        kw = dict(model=live_stack.model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                  tools=[CITY_TOOL], tool_choice=choice, seed=seed)
        if parallel is not None:
            kw["parallel_tool_calls"] = parallel
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        if choice == "auto" and not calls:
            assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
            continue
        assert c.finish_reason == "tool_calls" and c.message.content is None and calls
        assert len(calls) == 1 if parallel is False else 1 <= len(calls)
        keys = [(name, json.dumps(json.loads(arguments), sort_keys=True)) for name, arguments in calls]
        assert len(set(keys)) == len(keys), f"identical calls in one message: {calls}"
        for name, arguments in calls:
            assert name == "get_weather"
            jsonschema.validate(json.loads(arguments), CITY_TOOL["function"]["parameters"])
        assert streamed_calls(client, **kw) == (calls, "tool_calls")  # seeded: the stream holds the same calls


def test_sdk_required_with_too_few_tokens_leaks_nothing(client, live_stack):
    kw = dict(model=live_stack.model, messages=ASK, tools=[CITY_TOOL], tool_choice="required", max_tokens=5)
    c = client.chat.completions.create(**kw).choices[0]
    assert (c.finish_reason, c.message.content, c.message.tool_calls) == ("length", None, None)
    assert streamed_calls(client, **kw) == ([], "length")


def test_sdk_nested_pydantic_models_as_response_format_and_as_a_tool(client, live_stack):
    ask = [{"role": "user", "content": "Ship a lamp to Paris, France."}]
    r = client.chat.completions.parse(model=live_stack.model, response_format=Shipment, temperature=0, max_tokens=80,
                                      messages=ask)
    assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Shipment)
    kw = dict(model=live_stack.model, messages=ask, tools=[openai.pydantic_function_tool(Shipment)],
              tool_choice="required", temperature=0, max_tokens=120)
    r = client.chat.completions.parse(**kw)
    with client.chat.completions.stream(**kw) as stream:
        streamed = stream.get_final_completion()
    for done in (r, streamed):
        assert done.choices[0].finish_reason == "tool_calls"
        assert all(isinstance(t.function.parsed_arguments, Shipment) for t in done.choices[0].message.tool_calls)


def test_sdk_tool_choice_none_answers_in_text(client, live_stack):
    r = client.chat.completions.create(model=live_stack.model, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=12)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_sdk_streamed_tool_calls_accumulate(client, live_stack):
    kw = dict(model=live_stack.model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
              max_tokens=300)
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    full = client.chat.completions.create(**kw)
    got = [(t.function.name, t.function.arguments) for t in final.choices[0].message.tool_calls]
    assert got == [(t.function.name, t.function.arguments) for t in full.choices[0].message.tool_calls]
    assert final.choices[0].finish_reason == "tool_calls"
    check_calls(final.choices[0].message.tool_calls)


def test_sdk_tool_result_round_trip(client, live_stack):
    first = client.chat.completions.create(model=live_stack.model, messages=ASK, tools=[WEATHER], parallel_tool_calls=False,
                                           tool_choice="required", temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    second = client.chat.completions.create(model=live_stack.model, messages=history, tools=[WEATHER],
                                            temperature=0, max_tokens=40)
    c = second.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    if c.message.tool_calls:
        check_calls(c.message.tool_calls)
    else:
        assert isinstance(c.message.content, str)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result reached the prompt


def test_sdk_schema_errors_are_400s_naming_the_param(client, live_stack):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live_stack.model, messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}})
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live_stack.model, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"


# --- LangChain ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(live_stack):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", model=live_stack.model,
                      max_tokens=120, temperature=0, max_retries=0)


@pytest.mark.parametrize("method", [None, "function_calling"])
def test_langchain_with_structured_output(chat, method):
    kw = {"method": method} if method else {}
    person = chat.with_structured_output(Person, **kw).invoke("Invent a person: a name and an age.")
    assert isinstance(person, Person)


def test_langchain_bind_tools_any_and_a_tool_loop(chat):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"It is sunny in {city}."

    llm = chat.bind_tools([get_weather], tool_choice="any")
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.invoke(messages)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    assert isinstance(ai.tool_calls[0]["args"]["city"], str)
    messages += [ai] + [ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in ai.tool_calls]
    final = chat.bind_tools([get_weather]).invoke(messages)  # auto: a call or an answer, well-formed either way
    assert final.tool_calls or isinstance(final.content, str)
    for c in final.tool_calls:
        assert c["name"] == "get_weather" and isinstance(c["args"]["city"], str)


def test_langchain_nested_model_tools_and_parallel_tool_calls(chat):
    shipment = chat.with_structured_output(Shipment, method="function_calling").invoke("Ship a lamp to Paris, France.")
    assert isinstance(shipment, Shipment)
    for parallel in (False, True):
        ai = chat.bind_tools([Shipment], tool_choice="any", parallel_tool_calls=parallel).invoke(
            "Ship a lamp to Paris and a chair to Rome.")
        assert ai.tool_calls and not ai.invalid_tool_calls
        assert len(ai.tool_calls) == 1 if not parallel else len(ai.tool_calls) >= 1
        for call in ai.tool_calls:
            assert call["name"] == "Shipment" and Shipment.model_validate(call["args"])


# --- LlamaIndex -----------------------------------------------------------------------------------
class ShipArgs(BaseModel):
    shipment: Shipment


def ship(shipment: dict) -> str:
    """Ship an item to an address."""
    return "shipped"


def llama_index_llm(live_stack):
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model=live_stack.model, api_base=f"{live_stack.base_url}/v1", api_key="unused",
                      is_chat_model=True, is_function_calling_model=True, max_tokens=120, temperature=0,
                      max_retries=0, context_window=1024)


def test_llamaindex_chat_with_tools_and_structured_predict(live_stack):
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"It is sunny in {city}."

    llm = llama_index_llm(live_stack)
    tool = FunctionTool.from_defaults(fn=get_weather)
    r = llm.chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True)
    calls = llm.get_tool_calls_from_response(r, error_on_no_tool_call=True)
    assert calls[0].tool_name == "get_weather" and isinstance(calls[0].tool_kwargs["city"], str)
    person = llm.structured_predict(Person, PromptTemplate("Invent a person called {name}."), name="Ada")
    assert isinstance(person, Person)

    for parallel in (False, True):
        r = llm.chat_with_tools([FunctionTool.from_defaults(fn=ship, fn_schema=ShipArgs)], user_msg="Ship a lamp to Paris, France.",
                                tool_required=True, allow_parallel_tool_calls=parallel)
        calls = llm.get_tool_calls_from_response(r, error_on_no_tool_call=True)
        assert len(calls) == 1 if not parallel else len(calls) >= 1
        assert all(c.tool_name == "ship" and Shipment.model_validate(c.tool_kwargs["shipment"]) for c in calls)


async def test_llamaindex_function_agent_runs_a_tool_and_answers(live_stack):
    from llama_index.core.agent.workflow import FunctionAgent

    cities = []

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        cities.append(city)
        return f"It is sunny in {city}."

    # The agent streams its tool calls. A 270M base model asks for the weather again after the answer,
    # so the agent stops after a few rounds and has the model answer ("generate"), as agents cap loops.
    agent = FunctionAgent(tools=[get_weather], llm=llama_index_llm(live_stack), early_stopping_method="generate",
                          system_prompt="Use the tools to answer.")
    answer = await agent.run("What is the weather in Paris?", max_iterations=3)
    assert cities and all(isinstance(c, str) for c in cities)
    assert isinstance(str(answer), str) and str(answer).strip()
