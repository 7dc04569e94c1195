"""Two model-server replicas behind one API endpoint (BACKEND_URLS): the OpenAI SDK, LangChain and
LlamaIndex get the answers one model server gives, requests spread over both replicas, a
conversation's turns stay on one, and with one replica killed new requests still succeed."""

from __future__ import annotations

import signal

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from llama_index.llms.openai_like import OpenAILike

from tests.stack import running_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("replica-logs"), replicas=2) as stack:
        yield stack


def generated(stack) -> list[int]:
    return [httpx.get(f"{u}/stats").json()["tokens_generated"] for u in stack.backend_urls]


def test_clients_through_two_replicas(two, live_stack):
    sdk = openai.OpenAI(base_url=f"{two.base_url}/v1", api_key="unused", max_retries=0)
    one = openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)
    health = httpx.get(f"{two.base_url}/health").json()
    assert health["status"] == "ok" and [r["status"] for r in health["replicas"]] == ["ok", "ok"]
    before = generated(two)
    # Different prompts, greedy: each the answer a single model server gives.
    for i, city in enumerate(["France", "Italy", "Spain", "Japan", "Peru", "Egypt"]):
        kw = dict(model=two.model, prompt=f"Fact {i}. The capital of {city} is", max_tokens=8, temperature=0)
        assert sdk.completions.create(**kw).choices[0].text == one.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(
        model=two.model, prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == one.completions.create(model=two.model, prompt="1, 2, 3,", max_tokens=6, temperature=0).choices[0].text
    after = generated(two)
    assert all(a > b for a, b in zip(after, before))  # both replicas served some of them

    chat = ChatOpenAI(base_url=f"{two.base_url}/v1", api_key="unused", model=two.model, max_tokens=12, temperature=0,
                      max_retries=0)
    question = "What is the capital of France?"
    want = one.chat.completions.create(model=two.model, messages=[{"role": "user", "content": question}],
                                       max_completion_tokens=12, temperature=0).choices[0].message.content
    assert chat.invoke(question).content == want
    llm = OpenAILike(model=two.model, api_base=f"{two.base_url}/v1", api_key="unused", is_chat_model=False,
                     max_tokens=10, temperature=0, max_retries=0, context_window=1024)
    assert llm.complete("The capital of France is").text == one.completions.create(
        model=two.model, prompt="The capital of France is", max_tokens=10, temperature=0).choices[0].text


def test_a_conversation_stays_on_one_replica(two):
    sdk = openai.OpenAI(base_url=f"{two.base_url}/v1", api_key="unused", max_retries=0)
    system = {"role": "system", "content": "You answer questions about the solar system, briefly and precisely. " * 8}
    messages = [system, {"role": "user", "content": "Which planet is largest?"}]
    served = []
    for turn in range(3):
        before = generated(two)
        r = sdk.chat.completions.create(model=two.model, messages=messages, max_tokens=8, temperature=0)
        delta = [a - b for a, b in zip(generated(two), before)]
        served.append(delta.index(max(delta)))  # the replica that generated this turn
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"And the next one, {turn}?"}]
    assert len(set(served)) == 1


def test_one_replica_killed_new_requests_still_succeed(two):
    sdk = openai.OpenAI(base_url=f"{two.base_url}/v1", api_key="unused", max_retries=0)
    two.backends[1].send_signal(signal.SIGKILL)
    two.backends[1].wait(timeout=10)
    for i in range(6):
        r = sdk.completions.create(model=two.model, prompt=f"Count {i}: one, two,", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
    replicas = httpx.get(f"{two.base_url}/health").json()["replicas"]
    assert [r["status"] for r in replicas] == ["ok", "error"]
