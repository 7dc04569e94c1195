"""Both layers together over HTTP, on the real default model (the live stack of conftest.py)."""

from __future__ import annotations

import asyncio
import json

import httpx


def post(stack, path, body, **kw):
    return httpx.post(f"{stack.base_url}{path}", json=body, timeout=120, **kw)


def test_completion_greedy_matches_the_engine_alone(live_stack, model_service):
    from backend.local import run_requests
    from common.protocol import GenerationRequest

    r = post(live_stack, "/v1/completions", {"model": live_stack.model, "prompt": "The capital of France is",
                                             "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    direct = GenerationRequest(id="e2e", prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.json()["choices"][0]["text"] == run_requests(model_service, [direct])["e2e"].choices[0].text


def test_chat_stream_over_http(live_stack):
    body = {"model": live_stack.model, "messages": [{"role": "user", "content": "Write a haiku about rain."}],
            "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}, "seed": 1}
    with httpx.stream("POST", f"{live_stack.base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 16 and chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_context_overflow_is_400(live_stack):
    r = post(live_stack, "/v1/completions", {"model": live_stack.model, "prompt": "word " * 1500, "max_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_concurrent_requests_do_not_corrupt_each_other(live_stack):
    prompts = ["1, 2, 3,", "The sky is", "def add(a, b):", "Paris is", "Hello, my name is", "Roses are red,"]

    async def one(client, p):
        r = await client.post("/v1/completions", json={"model": live_stack.model, "prompt": p, "max_tokens": 10, "temperature": 0})
        return r.json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(base_url=live_stack.base_url, timeout=120) as c:
            alone = [await one(c, p) for p in prompts]
            together = await asyncio.gather(*(one(c, p) for p in prompts))
        return alone, together

    alone, together = asyncio.run(main())
    assert alone == list(together)


def test_client_disconnect_cancels_generation(live_stack):
    body = {"model": live_stack.model, "prompt": "Once upon a time", "max_tokens": 800, "stream": True}
    with httpx.stream("POST", f"{live_stack.base_url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got a token: hang up
    # The model server frees the sequence: soon it has no request in flight.
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _active(live_stack) == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the model server still runs the abandoned request")


def _active(stack) -> int:
    return httpx.get(f"{stack.backend_url}/stats").json()["active_requests"]


def test_non_streaming_client_disconnect_cancels_generation(live_stack):
    import time

    body = {"model": live_stack.model, "prompt": "Once upon a time", "max_tokens": 900}
    try:
        httpx.post(f"{live_stack.base_url}/v1/completions", json=body, timeout=1.0)
    except httpx.ReadTimeout:
        pass  # we hung up while it was generating
    assert _active(live_stack) == 1
    deadline = time.monotonic() + 10
    while _active(live_stack) != 0:
        assert time.monotonic() < deadline, "the model server still runs the abandoned request"
        time.sleep(0.2)
