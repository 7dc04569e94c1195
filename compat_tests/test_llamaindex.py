"""LlamaIndex OpenAILike: completions (is_chat_model=False, its default) and chat (True); each answer
is the one the OpenAI SDK gets for the same request."""

from __future__ import annotations

import openai
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike


def make(live_stack, chat: bool) -> OpenAILike:
    return OpenAILike(model=live_stack.model, api_base=f"{live_stack.base_url}/v1", api_key="unused",
                      is_chat_model=chat, max_tokens=10, temperature=0, max_retries=0, context_window=1024)


def sdk(live_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


def test_completion_model(live_stack):
    llm = make(live_stack, chat=False)
    r = llm.complete("The capital of France is")
    expected = sdk(live_stack).completions.create(model=live_stack.model, prompt="The capital of France is",
                                                  max_tokens=10, temperature=0).choices[0].text
    assert r.text == expected and len(r.text) > 3
    assert "".join(c.delta for c in llm.stream_complete("The capital of France is")) == r.text


def test_chat_model(live_stack):
    llm = make(live_stack, chat=True)
    r = llm.chat([ChatMessage(role="user", content="Say hello.")])
    expected = sdk(live_stack).chat.completions.create(model=live_stack.model, max_tokens=10, temperature=0,
                                                       messages=[{"role": "user", "content": "Say hello."}])
    assert r.message.content == expected.choices[0].message.content and len(r.message.content) > 3
    streamed = "".join(c.delta or "" for c in llm.stream_chat([ChatMessage(role="user", content="Say hello.")]))
    assert streamed == r.message.content
