"""The official `openai` SDK, unchanged, pointed at our base URL."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(live_stack):
    return openai.AsyncOpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


def test_models(client, live_stack):
    assert [m.id for m in client.models.list()] == [live_stack.model]
    assert client.models.retrieve(live_stack.model).id == live_stack.model


def test_completion_greedy(client, live_stack):
    r = client.completions.create(model=live_stack.model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert "capital" in r.choices[0].text or "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 6


def test_completion_token_prompts_and_n(client, live_stack):
    r = client.completions.create(model=live_stack.model, prompt=[[2, 818, 5279], [2, 818]], n=2, max_tokens=3, seed=5,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12
    assert all(c.finish_reason == "length" for c in r.choices)
    again = client.completions.create(model=live_stack.model, prompt=[[2, 818, 5279], [2, 818]], n=2, max_tokens=3,
                                      seed=5, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible


def test_completion_logprobs_echo(client, live_stack):
    r = client.completions.create(model=live_stack.model, prompt="Hello world", max_tokens=2, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("Hello world")
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)


def test_completion_stream(client, live_stack):
    chunks = list(client.completions.create(model=live_stack.model, prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = client.completions.create(model=live_stack.model, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_chat(client, live_stack):
    kw = dict(model=live_stack.model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
              max_completion_tokens=10, n=2, seed=3, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kw)
    assert len(r.choices) == 2 and r.choices[0].message.role == "assistant"
    content = r.choices[0].logprobs.content
    assert r.usage.completion_tokens == 20 or "stop" in {c.finish_reason for c in r.choices}
    assert len(content) >= 1 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    again = client.chat.completions.create(**kw)  # seeded n=2: the same two answers again
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_chat_stream(client, live_stack):
    kw = dict(model=live_stack.model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    full = client.chat.completions.create(**kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert len(full.choices[0].message.content) > 5


async def test_async_client(aclient, client, live_stack):
    import asyncio

    kw = dict(model=live_stack.model, messages=[{"role": "user", "content": "Name three colours."}], max_tokens=12,
              temperature=0)
    answers = await asyncio.gather(*(aclient.chat.completions.create(**kw) for _ in range(4)))
    texts = [a.choices[0].message.content for a in answers]
    assert len(texts[0]) > 5 and texts == [texts[0]] * 4  # four at once, greedy: four equal answers
    assert client.chat.completions.create(**kw).choices[0].message.content == texts[0]
    stream = await aclient.completions.create(model=live_stack.model, prompt="Hi", max_tokens=8, temperature=0, stream=True)
    streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    full = await aclient.completions.create(model=live_stack.model, prompt="Hi", max_tokens=8, temperature=0)
    assert streamed == full.choices[0].text
    assert full.usage.completion_tokens == 8 or full.choices[0].finish_reason == "stop"


def test_errors_raise_the_right_exception_classes(client, live_stack):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=live_stack.model, prompt="word " * 1500, max_tokens=10)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live_stack.model, messages=[{"role": "user", "content": "x"}], temperature=7)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live_stack.model, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    assert e.value.param == "messages[0].content"
