"""The API layer against a model server mocked at the internal protocol (respx): request schemas,
the OpenAI error envelope, response shapes and SSE framing."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import respx
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from app.backend_client import BackendClient
from app.config import AppSettings
from app.main import create_app
from common.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerateBatch,
    ModelInfo,
    PromptEvent,
    TokenLogprob,
    TopLogprob,
)

BACKEND = "http://backend.test"
MODEL = "tiny-model"
INFO = ModelInfo(name=MODEL, path="/m.gguf", n_ctx=128, n_vocab=1000, n_parallel=4, chat_template="", chat_template_source="gemma", created=1)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def lp(token: str, logprob: float | None) -> TokenLogprob:
    top = [TopLogprob(token_id=1, token=token, bytes=list(token.encode()), logprob=logprob),
           TopLogprob(token_id=2, token="x", bytes=[120], logprob=-3.0)] if logprob is not None else []
    return TokenLogprob(token_id=1, token=token, bytes=list(token.encode()), logprob=logprob, top=top)


# What the model writes under a tool grammar, picked by the last message (cut ones end with "length").
TOOL_REPLIES = {
    "two calls": ('{"tool_calls": [{"name": "get_weather", "arguments": {"ci', 'ty": "Paris"}}, ',
                  '{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'),
    "cut in the second call": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ',
                               '{"name": "get_weather", "arguments": {"ci'),
    "cut in the first call": ('{"tool_calls": [{"name": "get_weather", ', '"arguments": {"city": "Par'),
    "cut before any call": ('{"tool_calls"', ": ["),
    "cut text": ('{"content": "It is sun', 'ny in Par'),
    "the same call twice": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ',
                            '{"name": "get_weather", "arguments": {"city":  "Paris"}}'),
}


def fake_generate(request: httpx.Request) -> httpx.Response:
    """Each request answers 'Hello world' per choice, or an error picked by its prompt. A prompt
    (or last chat message) starting with 'again' found 2 of its 3 tokens in the prompt cache."""
    batch = GenerateBatch.model_validate_json(request.content)
    lines = []
    for r in batch.requests:
        if r.prompt == "too long":
            lines.append(ErrorEvent(id=r.id, message="This model's maximum context length is 128 tokens.",
                                    code="context_length_exceeded", param="prompt"))
            continue
        if r.prompt == "busy":
            lines.append(ErrorEvent(id=r.id, message="The model server is at capacity.", code="overloaded"))
            continue
        echo = (r.prompt if isinstance(r.prompt, str) else "<tokens>") if r.echo_prompt else None
        text = r.prompt if isinstance(r.prompt, str) else (r.messages[-1].content if r.messages else "")
        cached = 2 if text.startswith("again") else 0
        words, finish = ("Hello", " world"), "stop" if r.grammar else "length"
        if r.grammar is not None and r.grammar.param in ("tools", "functions"):
            words = TOOL_REPLIES.get(text, TOOL_REPLIES["two calls"])
            finish = "length" if text.startswith("cut") else "stop"
        lines.append(PromptEvent(id=r.id, prompt_tokens=3, cached_tokens=cached, text=echo,
                                 logprobs=[lp("<p>", None)] if r.prompt_logprobs else None))
        for i in range(r.n):
            for word in words:
                lines.append(DeltaEvent(id=r.id, index=i, text=word, token_ids=[7],
                                        logprobs=[lp(word, -0.5)] if r.logprobs is not None else None))
            lines.append(DoneEvent(id=r.id, index=i, finish_reason=finish, completion_tokens=2))
    body = "".join(e.model_dump_json() + "\n" for e in lines)
    return httpx.Response(200, content=body.encode(), headers={"content-type": "application/x-ndjson"})


@pytest.fixture
async def api():
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.get("/info").respond(200, content=INFO.model_dump_json())
        mock.get("/health").respond(200, json={"status": "ok"})
        mock.post("/generate", name="generate").mock(side_effect=fake_generate)
        mock.post("/cancel").respond(200, json={"cancelled": []})
        app = create_app(AppSettings(backend_url=BACKEND, max_wait_ms=0), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
                client.mock = mock
                client.app = app
                yield client


def sent_requests(api) -> list:
    """The generation requests of the last batch the API layer sent to the model server."""
    return GenerateBatch.model_validate_json(api.mock.routes["generate"].calls.last.request.content).requests


def sse_events(body: str) -> list[str]:
    """Strict SSE parsing: only 'data: ' lines separated by blank lines, nothing else."""
    blocks = [b for b in body.split("\n\n") if b.strip()]
    out = []
    for b in blocks:
        assert b.startswith("data: ") and "\n" not in b, f"unexpected SSE block {b!r}"
        out.append(b[len("data: "):])
    return out


def named_sse_events(body: str) -> list[dict]:
    """Strict SSE parsing of named events (Responses, Anthropic Messages): each block is `event: <type>`
    then `data: <json>` whose `type` is that name."""
    out = []
    for block in filter(str.strip, body.split("\n\n")):
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        event = json.loads(lines[1][len("data: "):])
        assert event["type"] == lines[0][len("event: "):], block
        out.append(event)
    return out


async def test_models_lists_the_backend_model(api):
    r = await api.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL and r.json()["object"] == "list"


async def test_completion_shape_and_usage(api):
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert r.status_code == 200, r.text
    c = Completion.model_validate(r.json())
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert all(ch.text == "Hello world" and ch.finish_reason == "length" for ch in c.choices)
    assert c.usage.prompt_tokens == 6 and c.usage.completion_tokens == 8 and c.usage.total_tokens == 14
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # present even when nothing was cached


async def test_completion_logprobs_and_echo(api):
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": "Say", "echo": True, "logprobs": 1})
    # As OpenAI does, the echoed first prompt token has null logprobs (the SDK's strict type disagrees).
    ch = r.json()["choices"][0]
    assert ch["text"] == "SayHello world"
    assert ch["logprobs"]["tokens"] == ["<p>", "Hello", " world"]
    assert ch["logprobs"]["token_logprobs"] == [None, -0.5, -0.5]
    assert ch["logprobs"]["top_logprobs"][0] is None and ch["logprobs"]["top_logprobs"][1]["Hello"] == -0.5
    assert ch["logprobs"]["text_offset"] == [0, 3, 8]


async def test_chat_shape_and_logprobs(api):
    r = await api.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 2})
    assert r.status_code == 200, r.text
    c = ChatCompletion.model_validate(r.json())
    assert c.choices[0].message.content == "Hello world" and c.choices[0].message.role == "assistant"
    assert [t.token for t in c.choices[0].logprobs.content] == ["Hello", " world"]
    assert len(c.choices[0].logprobs.content[0].top_logprobs) == 2
    sent = sent_requests(api)[0]
    assert sent.max_tokens == 2 and sent.logprobs == 2 and sent.messages[0].content == "hi"


async def test_chat_stream_framing(api):
    r = await api.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = {c.choices[0].index: c for c in reversed(chunks) if c.choices}
    assert all(first[i].choices[0].delta.role == "assistant" for i in (0, 1))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(ch.delta.content or "" for ch in mine) == "Hello world"
        assert [ch.finish_reason for ch in mine][-1] == "length"
        assert all(ch.finish_reason is None for ch in mine[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(api):
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    events = sse_events(r.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "x"}]} | fields


def _completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "x"} | fields


def assert_error(r: httpx.Response, status: int, code: str | None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize(
    "path,body,status,code,param",
    [
        ("/v1/completions", {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "invalid_value", "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "invalid_value", "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "unsupported_parameter", "suffix"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"a": 1}}, 400, "invalid_value", "logit_bias"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "invalid_value", "prompt"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "too long"}, 400, "context_length_exceeded", "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "tool_choice": "auto"}, 400, None, "tool_choice"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [TOOL],
                                  "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, None, "tool_choice"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "function_call": {"name": "f"}}, 400, None, "function_call"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema"}}, 400, None, "response_format"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "xml"}}, 400, "invalid_value", "response_format.type"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400,
         "missing_required_parameter", "messages[0].tool_call_id"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "unsupported_parameter", "messages[0].content"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, None, "top_logprobs"),
        # what OpenAI and vLLM refuse as well
        ("/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400, None, "stream_options"),
        ("/v1/completions", _completion(stream=False, stream_options={"include_usage": True}), 400, None, "stream_options"),
        ("/v1/chat/completions", _chat(tools=[]), 400, "invalid_value", "tools"),
        ("/v1/chat/completions", _chat(tools=[TOOL] * 129), 400, "invalid_value", "tools"),
        ("/v1/chat/completions", _chat(functions=[]), 400, "invalid_value", "functions"),
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": None}]), 400, None, "messages[0].content"),
        ("/v1/chat/completions", _chat(messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]},
            {"role": "tool", "tool_call_id": "a", "content": "sunny"}]),
         400, None, "messages[1].tool_calls[1].function.arguments"),
        ("/v1/chat/completions", _chat(messages=[
            {"role": "user", "content": "x"}, {"role": "assistant", "function_call": {"name": "f", "arguments": "{oops}"}}]),
         400, None, "messages[1].function_call.arguments"),
        ("/v1/chat/completions", _chat(tools=[TOOL, {"type": "function", "function": {"name": "ship", "parameters": {
            "type": "object", "properties": {"to": {"$ref": "#/$defs/Adress"}}, "$defs": {"Address": {"type": "object"}}}}}]),
         400, None, "tools[1].function.parameters"),
        ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}]),
         400, None, "tools[0].function.parameters"),
        ("/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}}}}), 400, None, "response_format"),
    ],
)
async def test_client_mistakes_get_the_openai_envelope(api, path, body, status, code, param):
    assert_error(await api.post(path, json=body), status, code, param)


async def test_malformed_json_is_400(api):
    r = await api.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")


async def test_context_error_on_a_stream_is_an_http_error_not_a_broken_stream(api):
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": "too long", "stream": True})
    assert_error(r, 400, "context_length_exceeded")


async def test_unknown_route_is_404_envelope(api):
    assert_error(await api.get("/v1/nothing"), 404, "not_found")


async def test_backend_down_is_503():
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.get("/info").mock(side_effect=httpx.ConnectError("refused"))
        mock.post("/generate").mock(side_effect=httpx.ConnectError("refused"))
        mock.get("/health").mock(side_effect=httpx.ConnectError("refused"))
        app = create_app(AppSettings(backend_url=BACKEND), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
                assert_error(await c.get("/v1/models"), 503, "backend_unavailable")
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                assert_error(r, 503, "backend_unavailable")
                assert (await c.get("/health")).status_code == 503


async def test_api_key_is_enforced_when_set():
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.get("/info").respond(200, content=INFO.model_dump_json())
        app = create_app(AppSettings(backend_url=BACKEND, api_key="sekret"), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
                assert_error(await c.get("/v1/models"), 401, "invalid_api_key")
                ok = await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
                assert ok.status_code == 200


async def test_completion_fields_reach_the_model_server_mapped(api):
    r = await api.post("/v1/completions", json={
        "model": MODEL, "prompt": "Say", "stop": "END", "seed": 42, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "logit_bias": {"15": -50, "7": 3.5}, "echo": True, "logprobs": 2,
        "top_p": 0.9, "n": 2, "max_tokens": 9, "ignore_eos": True})
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert sent.prompt == "Say" and sent.messages is None
    assert sent.stop == ["END"]  # a string becomes a one-element list
    assert sent.seed == 42 and sent.n == 2 and sent.max_tokens == 9 and sent.top_p == 0.9
    assert sent.presence_penalty == 0.5 and sent.frequency_penalty == -0.25
    assert sent.logit_bias == {15: -50.0, 7: 3.5}  # string keys become token ids
    assert sent.temperature == 1.0  # OpenAI's default when the field is absent
    assert sent.echo_prompt and sent.prompt_logprobs and sent.logprobs == 2  # echo + logprobs: prompt logprobs
    assert sent.ignore_eos


async def test_completion_defaults_and_nulls_reach_the_model_server_as_openai_defaults(api):
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "temperature": None,
                                                "top_p": None, "stop": ["a", ""], "echo": True})
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert sent.prompt == [1, 2, 3] and sent.temperature == 1.0 and sent.top_p == 1.0
    assert sent.max_tokens == 16  # OpenAI's completions default
    assert sent.stop == ["a"] and sent.seed is None and sent.logit_bias == {}
    assert sent.echo_prompt and not sent.prompt_logprobs and sent.logprobs is None  # echo alone: text only


async def test_chat_fields_reach_the_model_server_mapped(api):
    r = await api.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "max_tokens": 20, "max_completion_tokens": 7, "temperature": 0, "stop": ["\n\n", "User:"], "seed": 3,
        "logit_bias": {"100": 100}})
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert sent.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert [(m.role, m.content) for m in sent.messages] == [("system", "Be brief."), ("user", "hi")]
    assert sent.temperature == 0.0 and sent.stop == ["\n\n", "User:"] and sent.seed == 3
    assert sent.logit_bias == {100: 100.0} and sent.logprobs is None and not sent.echo_prompt
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 20})
    [sent] = sent_requests(api)
    assert sent.max_tokens == 20 and sent.temperature == 1.0 and sent.stop == []
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert sent_requests(api)[0].max_tokens is None  # chat without a limit: up to the context


def assert_429(r: httpx.Response):
    assert_error(r, 429, "queue_full")
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "1"


async def test_a_full_queue_is_429_with_retry_after_over_http():
    """One request holds the only admission slot (its stream stays open); the next gets a 429,
    streaming or not, and once the first finishes a request is admitted again."""
    import asyncio

    release = asyncio.Event()

    async def held_stream(rid: str):
        yield (PromptEvent(id=rid, prompt_tokens=1).model_dump_json() + "\n").encode()
        await release.wait()
        yield (DoneEvent(id=rid, index=0, finish_reason="length", completion_tokens=0).model_dump_json() + "\n").encode()

    def generate(request: httpx.Request) -> httpx.Response:
        rid = GenerateBatch.model_validate_json(request.content).requests[0].id
        return httpx.Response(200, content=held_stream(rid), headers={"content-type": "application/x-ndjson"})

    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.get("/info").respond(200, content=INFO.model_dump_json())
        mock.post("/generate").mock(side_effect=generate)
        mock.post("/cancel").respond(200, json={"cancelled": []})
        app = create_app(AppSettings(backend_url=BACKEND, max_wait_ms=0, max_queue=1), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
                first = asyncio.create_task(c.post("/v1/completions", json=body))
                await asyncio.sleep(0.2)
                assert not first.done()  # admitted, held by the model server
                assert_429(await c.post("/v1/completions", json=body))
                assert_429(await c.post("/v1/completions", json=body | {"stream": True}))
                # Two prompts in one call are two requests: more than the queue holds even when idle.
                release.set()
                assert (await first).status_code == 200
                assert_429(await c.post("/v1/completions", json=body | {"prompt": ["a", "b"]}))
                assert (await c.post("/v1/completions", json=body)).status_code == 200


async def test_an_overloaded_model_server_becomes_429(api):
    assert_429(await api.post("/v1/completions", json={"model": MODEL, "prompt": "busy"}))
    assert_429(await api.post("/v1/completions", json={"model": MODEL, "prompt": "busy", "stream": True}))


async def test_cached_prompt_tokens_are_reported_like_openai(api):
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": ["again a", "b", "again c"], "max_tokens": 2})
    assert r.status_code == 200, r.text
    c = Completion.model_validate(r.json())
    assert c.usage.prompt_tokens == 9 and c.usage.prompt_tokens_details.cached_tokens == 4  # summed over prompts
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "again"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": ["again a", "again b"], "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "again"}], "n": 2}),
])
async def test_cached_prompt_tokens_in_the_streamed_usage_chunk(api, path, body):
    r = await api.post(path, json={"model": MODEL, "stream": True, "stream_options": {"include_usage": True}} | body)
    assert r.status_code == 200, r.text
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    usage = chunks[-1]["usage"]
    prompts = len(body.get("prompt", [None]))
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] == 3 * prompts
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2 * prompts}


async def test_the_batcher_knows_the_model_server_capacity_before_the_first_request():
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        info = mock.get("/info").respond(503, json={"status": "loading"})  # the watcher's first look finds it loading
        mock.post("/generate", name="generate").mock(side_effect=fake_generate)
        app = create_app(AppSettings(backend_url=BACKEND, max_wait_ms=0), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.05)
            assert info.called and app.state.router.replicas[0].batcher.capacity is None  # nothing knows the capacity yet
            info.respond(200, content=INFO.model_dump_json())  # ready; the watcher's next look is seconds away
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
                client.mock, client.app = mock, app
                await _capacity_is_known_before_the_first_batch(client)


async def _capacity_is_known_before_the_first_batch(api):
    batcher = api.app.state.router.replicas[0].batcher
    seen = []
    api.mock.routes["generate"].side_effect = lambda request: (seen.append(batcher.capacity), fake_generate(request))[1]
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 200, r.text
    assert seen == [INFO.n_parallel]


async def test_response_format_becomes_a_json_schema_grammar(api):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for fmt, want in [({"type": "json_object"}, {"type": "object"}),
                      ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}, schema)]:
        r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                         "response_format": fmt})
        assert r.status_code == 200, r.text
        [sent] = sent_requests(api)
        assert sent.grammar.type == "json_schema" and sent.grammar.value == want and sent.grammar.param == "response_format"
    r = await api.post("/v1/completions", json={"model": MODEL, "prompt": "x", "response_format": {"type": "json_object"}})
    assert r.status_code == 200 and sent_requests(api)[0].grammar.value == {"type": "object"}
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "response_format": {"type": "text"}})
    assert sent_requests(api)[0].grammar is None


async def test_tools_and_history_reach_the_model_server(api):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "12 C"},
    ]
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": [TOOL],
                                                     "tool_choice": "required", "parallel_tool_calls": False})
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert [t.name for t in sent.tools] == ["get_weather"]
    assert sent.grammar.param == "tools"
    assert sent.grammar.value["properties"]["tool_calls"]["maxItems"] == 1  # required, not parallel: one call, no text
    assert sent.messages[1].tool_calls[0].model_dump() == {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert (sent.messages[2].role, sent.messages[2].tool_call_id, sent.messages[2].name) == ("tool", "call_a", "get_weather")
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": messages[:1], "tools": [TOOL],
                                                     "tool_choice": "none"})
    [sent] = sent_requests(api)
    assert sent.grammar is None and sent.tools == []


async def test_tool_calls_reply_shape(api):
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "tools": [TOOL]})
    body = ChatCompletion.model_validate(r.json())
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Oslo"})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


async def test_streamed_tool_calls_in_openais_shape(api):
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                     "tools": [TOOL], "stream": True})
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in sse_events(r.text)[:-1]]
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            if tc.id:  # first delta of a call: id, type and name
                assert tc.index not in calls and tc.function.name and tc.type == "function"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
            else:
                assert tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


def _tool_chat(last: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": last}], "tools": [TOOL]} | fields


def _streamed_reply(r: httpx.Response) -> tuple[str | None, list, str]:
    """content, [(index, id, name, arguments)] and finish_reason of a streamed choice 0, each call
    checked to come whole in the first and only delta of its index."""
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in sse_events(r.text)[:-1]]
    content, calls = None, []
    for c in chunks:
        delta = c.choices[0].delta
        if delta.content:
            content = (content or "") + delta.content
        for tc in delta.tool_calls or []:
            assert tc.index == len(calls) and tc.id and tc.type == "function" and tc.function.name
            calls.append((tc.index, tc.id, tc.function.name, tc.function.arguments))
    return content, calls, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("last,content,calls,finish", [
    # a call cut by max_tokens is dropped; the complete ones before it stay, and the reply says it was cut
    ("cut in the second call", None, [{"city": "Paris"}], "length"),
    ("cut in the first call", None, [], "length"),
    ("cut before any call", None, [], "length"),  # no JSON passed off as content
    ("cut text", "It is sunny in Par", [], "length"),
    ("the same call twice", None, [{"city": "Paris"}], "tool_calls"),  # never two identical calls
    ("two calls", None, [{"city": "Paris"}, {"city": "Oslo"}], "tool_calls"),
])
async def test_a_reply_holds_only_complete_distinct_calls_streamed_or_not(api, last, content, calls, finish):
    r = await api.post("/v1/chat/completions", json=_tool_chat(last))
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (content, finish)
    assert [json.loads(c["function"]["arguments"]) for c in choice["message"].get("tool_calls") or []] == calls
    streamed = await api.post("/v1/chat/completions", json=_tool_chat(last, stream=True))
    s_content, s_calls, s_finish = _streamed_reply(streamed)
    assert (s_content, s_finish) == (content, finish)
    assert [json.loads(arguments) for _, _, _, arguments in s_calls] == calls


async def test_legacy_functions_map_onto_tools(api):
    r = await api.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"},
                                     {"role": "assistant", "function_call": {"name": "get_weather", "arguments": "{}"}},
                                     {"role": "function", "name": "get_weather", "content": "sunny"}],
        "functions": [TOOL["function"]], "function_call": {"name": "get_weather"}})
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert sent.grammar.param == "functions" and sent.grammar.value["properties"]["tool_calls"]["maxItems"] == 1
    assert sent.messages[1].tool_calls[0].name == "get_weather"
    assert (sent.messages[2].role, sent.messages[2].name) == ("tool", "get_weather")
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


# --- Robustness: the ranges OpenAI documents, strict types, input the model server could not be sent ---

@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", _completion(seed=2**63), "seed"),
        ("/v1/completions", _completion(seed=2**80), "seed"),
        ("/v1/chat/completions", _chat(seed=-(2**63) - 1), "seed"),
        ("/v1/completions", _completion(n=0), "n"),
        ("/v1/chat/completions", _chat(n=129), "n"),
        ("/v1/completions", _completion(max_tokens=-1), "max_tokens"),
        ("/v1/chat/completions", _chat(max_completion_tokens=-1), "max_completion_tokens"),
        ("/v1/completions", _completion(logprobs=-1), "logprobs"),
        ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        ("/v1/completions", _completion(best_of=21), "best_of"),
        ("/v1/completions", _completion(prompt=[5, -1]), "prompt[1]"),
        ("/v1/completions", _completion(prompt=[[5], []]), "prompt[1]"),
        ("/v1/completions", _completion(prompt=[[5], [2**80, -3]]), "prompt[1][1]"),
        ("/v1/completions", _completion(logit_bias={"-1": 5}), "logit_bias"),
        ("/v1/completions", _completion(logit_bias={"²": 5}), "logit_bias"),  # str.isdigit() says yes; int() no
        ("/v1/completions", _completion(logit_bias={"1" * 11: 5}), "logit_bias"),
        ("/v1/chat/completions", _chat(logit_bias={"7": 100.5}), "logit_bias"),
        # strict types, as OpenAI's: a string is not a number, a number not a boolean
        ("/v1/completions", _completion(n="2"), "n"),
        ("/v1/completions", _completion(max_tokens=2.5), "max_tokens"),
        ("/v1/chat/completions", _chat(stream="yes"), "stream"),
        ("/v1/chat/completions", _chat(logprobs=1), "logprobs"),
        ("/v1/completions", _completion(prompt=[True]), "prompt[0]"),
    ],
)
async def test_out_of_range_integers_and_wrong_types_are_400s_naming_the_param(api, path, body, param):
    r = await api.post(path, json=body)
    assert_error(r, 400, "invalid_value", param)
    assert api.mock.routes["generate"].call_count == 0  # refused before the model server saw it


async def test_the_edges_of_the_ranges_are_accepted(api):
    r = await api.post("/v1/completions", json=_completion(seed=2**63 - 1, n=4, logprobs=5, best_of=4,
                                                            logit_bias={"0": -100, "999": 100}, prompt=[[0, 999]]))
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert sent.seed == 2**63 - 1 and sent.logit_bias == {0: -100.0, 999: 100.0} and sent.prompt == [0, 999]
    r = await api.post("/v1/chat/completions", json=_chat(seed=-(2**63), n=2.0, max_completion_tokens=0,
                                                         logprobs=True, top_logprobs=20))
    assert r.status_code == 200, r.text
    [sent] = sent_requests(api)
    assert sent.seed == -(2**63) and sent.n == 2 and sent.max_tokens == 0 and sent.logprobs == 20  # 2.0 is an integer


def vocabulary_generate(request: httpx.Request) -> httpx.Response:
    """The model server's own check (backend/prepare.py): token ids at or past n_vocab are refused with an
    invalid_request error event naming the field, before the prompt event."""
    batch = GenerateBatch.model_validate_json(request.content)
    lines = []
    for r in batch.requests:
        bad_prompt = isinstance(r.prompt, list) and any(t >= INFO.n_vocab for t in r.prompt)
        bad_bias = any(t >= INFO.n_vocab for t in r.logit_bias)
        if bad_prompt or bad_bias:
            lines.append(ErrorEvent(id=r.id, message="token id outside the vocabulary (0..999)", code="invalid_request",
                                    param="prompt" if bad_prompt else "logit_bias"))
        else:
            lines.append(PromptEvent(id=r.id, prompt_tokens=1))
            lines += [DeltaEvent(id=r.id, index=0, text="ok", token_ids=[7]),
                      DoneEvent(id=r.id, index=0, finish_reason="length", completion_tokens=1)]
    body = "".join(e.model_dump_json() + "\n" for e in lines)
    return httpx.Response(200, content=body.encode(), headers={"content-type": "application/x-ndjson"})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", _completion(prompt=[1, 2, INFO.n_vocab]), "prompt"),
    ("/v1/completions", _completion(prompt=[[1, 2], [3, INFO.n_vocab + 5]]), "prompt"),
    ("/v1/completions", _completion(logit_bias={str(INFO.n_vocab): 1}), "logit_bias"),
    ("/v1/chat/completions", _chat(logit_bias={str(INFO.n_vocab): 1}), "logit_bias"),
])
async def test_token_ids_past_the_vocabulary_are_a_400_before_any_byte(api, path, body, param, stream):
    api.mock.routes["generate"].side_effect = vocabulary_generate
    r = await api.post(path, json=body | {"stream": stream})
    assert_error(r, 400, None, param)
    assert r.headers["content-type"].startswith("application/json") and "data:" not in r.text
    ok = await api.post(path, json=body | {"stream": stream, "prompt": [1, 2], "logit_bias": {"999": 1}}
                        if path == "/v1/completions" else body | {"stream": stream, "logit_bias": {"999": 1}})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b"}' % MODEL, "prompt"),
    ("/v1/completions", '{"model": "%s", "prompt": "x", "stop": ["ok", "\\udfff"]}' % MODEL, "stop[1]"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL,
     "messages[0].content"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "response_format": '
     '{"type": "json_schema", "json_schema": {"name": "s", "schema": {"description": "\\ud800"}}}}' % MODEL,
     "response_format.json_schema.schema.description"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
    ("/v1/completions", '{"model": "%s", "prompt": "x", "logit_bias": {"\\ud800": 1}}' % MODEL, "logit_bias"),
])
async def test_text_that_is_not_unicode_is_a_400_not_a_failed_batch(api, path, raw, param):
    """JSON's \\u escapes can spell a lone surrogate, which UTF-8 cannot encode: such a request used to fail
    the whole batch it joined with a 503 (the protocol could not serialize it)."""
    r = await api.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert api.mock.routes["generate"].call_count == 0


async def test_nesting_deeper_than_the_protocol_carries_is_a_400(api):
    schema: dict = {"type": "string"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"x": schema}}
    r = await api.post("/v1/chat/completions", json=_chat(response_format={
        "type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}))
    assert_error(r, 400, None, "response_format")
    assert "nested" in r.json()["error"]["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    assert_error(await api.post("/v1/chat/completions", json=_chat(tools=[tool])), 400, None, "tools")


@pytest.mark.parametrize("content,message", [
    (b"", "The request body is missing"),
    (b"[]", "The request body must be a JSON object"),
])
async def test_a_body_that_is_not_an_object_is_named_as_such(api, content, message):
    r = await api.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json", None)
    assert r.json()["error"]["message"].startswith(message) and "None" not in r.json()["error"]["message"]


async def test_union_errors_name_the_member_the_client_meant(api):
    r = await api.post("/v1/completions", json=_completion(prompt=5))
    assert_error(r, 400, "invalid_value", "prompt")
    assert r.json()["error"]["message"].endswith("one of: str, list[str], list[int], list[list[int]]")
    r = await api.post("/v1/chat/completions", json=_chat(
        tool_choice={"type": "function", "function": {"name": 5}}, tools=[TOOL]))
    assert_error(r, 400, "invalid_value", "tool_choice.function.name")
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"content": "x"}]})
    assert_error(r, 400, "invalid_value", "messages[0].role")
    r = await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "x"}, {"role": "function", "content": "sunny"}]})
    assert_error(r, 400, "missing_required_parameter", "messages[1].name")


async def test_the_openapi_document_states_the_ranges_and_the_error_envelope(api):
    doc = (await api.get("/openapi.json")).json()
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    seed = next(s for s in props["seed"]["anyOf"] if s.get("type") == "integer")
    assert (seed["minimum"], seed["exclusiveMaximum"]) == (-(2**63), 2**63)  # int64, exact as JSON numbers
    bias = next(s for s in props["logit_bias"]["anyOf"] if s.get("type") == "object")
    assert bias["propertyNames"] == {"pattern": "^[0-9]{1,10}$"}
    assert (bias["additionalProperties"]["minimum"], bias["additionalProperties"]["maximum"]) == (-100, 100)
    token_array = [s for s in props["prompt"]["anyOf"] if s.get("items", {}).get("type") == "integer"][0]
    assert token_array["items"]["minimum"] == 0 and token_array["minItems"] == 1
    messages = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["messages"]["items"]["oneOf"]
    assert len(messages) == 6
    assert doc["components"]["schemas"]["ToolMessage"]["required"] == ["role", "tool_call_id"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "422" not in responses  # FastAPI's default; this API answers 400
        for status in ("400", "401", "404", "429", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]


# --- NDJSON framing: the model server's lines end at "\n" only ---

SEPARATORS = "one\u2028two\u2029three\x85four\r\nfive\x1c six é€😀"


async def test_ndjson_lines_split_at_newline_bytes_only():
    from app.backend_client import ndjson_lines

    events = [DeltaEvent(id="a", index=0, text=SEPARATORS, token_ids=[1]),
              DoneEvent(id="a", index=0, finish_reason="stop", completion_tokens=1)]
    body = "".join(e.model_dump_json() + "\n" for e in events).encode()

    async def chunks(size):
        for i in range(0, len(body), size):
            yield body[i:i + size]  # cuts through lines and through multi-byte characters

    for size in (1, 2, 3, 7, 64, len(body)):
        assert [line async for line in ndjson_lines(chunks(size))] == body.split(b"\n")[:-1]


@pytest.mark.parametrize("stream", [False, True])
async def test_line_separators_in_generated_text_reach_the_client(api, stream):
    """U+2028, U+2029 and U+0085 are legal unescaped in JSON strings; the model writes them (a 270M base
    model continues a prompt full of them greedily). They used to split an event in two and fail the
    whole batch with a 503 "The model server stream failed: ValidationError"."""
    def generate(request: httpx.Request) -> httpx.Response:
        lines = []
        for r in GenerateBatch.model_validate_json(request.content).requests:
            lines += [PromptEvent(id=r.id, prompt_tokens=3, text=r.prompt if r.echo_prompt else None),
                      DeltaEvent(id=r.id, index=0, text=SEPARATORS, token_ids=[7]),
                      DoneEvent(id=r.id, index=0, finish_reason="length", completion_tokens=1)]
        body = "".join(e.model_dump_json() + "\n" for e in lines).encode()

        async def dribble():  # small chunks, as a busy model server's writes arrive
            for i in range(0, len(body), 5):
                yield body[i:i + 5]

        return httpx.Response(200, content=dribble(), headers={"content-type": "application/x-ndjson"})

    api.mock.routes["generate"].side_effect = generate
    r = await api.post("/v1/completions", json=_completion(prompt=["a\u2028b", "innocent"], echo=True, stream=stream))
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
        texts: dict[int, str] = {}
        for c in chunks:
            i = c["choices"][0]["index"]
            texts[i] = texts.get(i, "") + c["choices"][0]["text"]
        got = [texts[0], texts[1]]
    else:
        got = [c["text"] for c in r.json()["choices"]]
    assert got == ["a\u2028b" + SEPARATORS, "innocent" + SEPARATORS]
