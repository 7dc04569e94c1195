"""LangChain's ChatOpenAI (sends max_completion_tokens) and OpenAI (completions) against the live
stack: each answer is the one the OpenAI SDK gets for the same request."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import ChatOpenAI, OpenAI


@pytest.fixture(scope="module")
def sdk(live_stack):
    return openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def chat(live_stack):
    return ChatOpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", model=live_stack.model,
                      max_tokens=12, temperature=0, max_retries=0)


@pytest.fixture(scope="module")
def llm(live_stack):
    return OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", model=live_stack.model,
                  max_tokens=12, temperature=0, max_retries=0)


def sdk_chat(sdk, live_stack, question: str):
    return sdk.chat.completions.create(model=live_stack.model, messages=[{"role": "user", "content": question}],
                                       max_completion_tokens=12, temperature=0).choices[0]


def test_chat_invoke_stream_batch(chat, sdk, live_stack):
    expected = sdk_chat(sdk, live_stack, "Name a fruit.")
    msg = chat.invoke("Name a fruit.")
    assert msg.content == expected.message.content and len(msg.content) > 3
    assert msg.response_metadata["finish_reason"] == expected.finish_reason
    assert msg.usage_metadata["output_tokens"] == 12 or expected.finish_reason == "stop"
    streamed = "".join(chunk.content for chunk in chat.stream("Name a fruit."))
    assert streamed == msg.content  # greedy: the stream says the same
    out = chat.batch(["Name a fruit.", "Name a colour."])
    assert [m.content for m in out] == [msg.content, sdk_chat(sdk, live_stack, "Name a colour.").message.content]


def test_completions_llm_invoke_stream_batch(llm, sdk, live_stack):
    expected = sdk.completions.create(model=live_stack.model, prompt="The capital of France is", max_tokens=12,
                                      temperature=0).choices[0].text
    text = llm.invoke("The capital of France is")
    assert text == expected and len(text) > 3
    assert "".join(llm.stream("The capital of France is")) == text
    out = llm.batch(["The capital of France is", "1, 2, 3,"])
    assert out[0] == text and out[1] == sdk.completions.create(model=live_stack.model, prompt="1, 2, 3,", max_tokens=12,
                                                             temperature=0).choices[0].text
