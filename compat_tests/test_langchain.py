"""LangChain's ChatOpenAI (sends max_completion_tokens) and OpenAI (completions) against the live stack."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI, OpenAI


@pytest.fixture(scope="module")
def chat(live_stack):
    return ChatOpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", model=live_stack.model,
                      max_tokens=12, temperature=0, max_retries=0)


@pytest.fixture(scope="module")
def llm(live_stack):
    return OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", model=live_stack.model,
                  max_tokens=12, temperature=0, max_retries=0)


def test_chat_invoke_stream_batch(chat):
    msg = chat.invoke("Name a fruit.")
    assert isinstance(msg.content, str) and msg.content
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(chunk.content for chunk in chat.stream("Name a fruit."))
    assert streamed == msg.content  # greedy: the stream says the same
    out = chat.batch(["Name a fruit.", "Name a colour."])
    assert len(out) == 2 and out[0].content == msg.content


def test_completions_llm_invoke_stream_batch(llm):
    text = llm.invoke("The capital of France is")
    assert isinstance(text, str) and text
    assert "".join(llm.stream("The capital of France is")) == text
    assert llm.batch(["The capital of France is", "1, 2, 3,"])[0] == text
