"""Both layers together over HTTP, on the real default model (the live stack of conftest.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.stop_strings import spanning_stop


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


def test_context_overflow_on_a_stream_is_a_400_before_any_byte(live_stack):
    for path, body in (("/v1/completions", {"prompt": "word " * 1500}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1500}]})):
        body = {"model": live_stack.model, "max_tokens": 5, "stream": True} | body
        with httpx.stream("POST", f"{live_stack.base_url}{path}", json=body, timeout=120) as r:
            raw = r.read().decode()
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), raw
        assert "data:" not in raw
        err = json.loads(raw)["error"]
        assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error" and "1024" in err["message"]


def test_stop_strings_through_the_api_and_sse(live_stack):
    """A stop string that spans tokens cuts the text where it begins, in completions and chat,
    streamed and not; nothing of it is sent (the live stack speculates with the shipped heads)."""
    base = {"model": live_stack.model, "max_tokens": 30, "temperature": 0}
    choice = post(live_stack, "/v1/completions", base | {"prompt": "The capital of France is", "logprobs": 0}).json()["choices"][0]
    free, pieces = choice["text"], choice["logprobs"]["tokens"]
    assert "".join(pieces) == free
    stop = spanning_stop(pieces)  # across a token boundary of what the model writes here
    cut = free[: free.index(stop)]
    for stream in (False, True):
        body = base | {"prompt": "The capital of France is", "stop": stop, "stream": stream}
        text, finish, raw = _completion_text(live_stack, body)
        assert (text, finish) == (cut, "stop") and stop not in raw
    chat = {"messages": [{"role": "user", "content": "Count from one to ten in words."}]}
    free_chat = post(live_stack, "/v1/chat/completions", base | chat).json()["choices"][0]["message"]["content"]
    stop = free_chat[len(free_chat) // 2: len(free_chat) // 2 + 4]
    assert len(stop) == 4 and stop in free_chat
    for stream in (False, True):
        body = base | chat | {"stop": [stop, "never appears"], "stream": stream}
        text, finish, raw = _chat_text(live_stack, body)
        assert (text, finish) == (free_chat[: free_chat.index(stop)], "stop") and stop not in raw


def _answer(stack, path: str, body: dict, text_of) -> tuple[str, str, str]:
    """(text, finish_reason, raw body) of one choice, streamed or not; text_of(choice, streamed)."""
    r = post(stack, path, body)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        choice = r.json()["choices"][0]
        return text_of(choice, False), choice["finish_reason"], r.text
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    return "".join(text_of(c["choices"][0], True) for c in chunks), chunks[-1]["choices"][0]["finish_reason"], r.text


def _completion_text(stack, body) -> tuple[str, str, str]:
    return _answer(stack, "/v1/completions", body, lambda choice, _: choice["text"])


def _chat_text(stack, body) -> tuple[str, str, str]:
    return _answer(stack, "/v1/chat/completions", body,
                   lambda choice, streamed: (choice["delta"].get("content") or "") if streamed else choice["message"]["content"])


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


def _stats(stack) -> dict:
    return httpx.get(f"{stack.backend_url}/stats").json()


def _generation_stops(stack, since: float, quiet_s: float = 1.0, timeout_s: float = 10.0) -> tuple[int, float]:
    """Poll the model server's generated-token count until it has not moved for `quiet_s`; return
    the count and how long after `since` it last moved."""
    last, changed = _stats(stack)["tokens_generated"], time.monotonic()
    while time.monotonic() - changed < quiet_s:
        assert time.monotonic() - since < timeout_s, "the model server still generates for the abandoned request"
        time.sleep(0.05)
        now = _stats(stack)["tokens_generated"]
        if now != last:
            last, changed = now, time.monotonic()
    return last, changed - since


def _assert_stopped_soon(stack, before: int, started: float, max_tokens: int, within_s: float) -> None:
    """After the client left: generation stopped within `within_s`, having made no more tokens than
    its own pace allows in that time, far below what was asked for."""
    left = time.monotonic()
    at_left = _stats(stack)["tokens_generated"]
    assert at_left > before  # it was generating when the client left
    pace = (at_left - before) / (left - started)  # tokens a second, this machine, this run
    total, moved_after = _generation_stops(stack, left)
    assert moved_after < within_s
    assert total - at_left <= pace * within_s + 8
    assert total - before < max_tokens / 2
    assert _stats(stack)["active_requests"] == 0


# ignore_eos: the request can only end by the client leaving (or at max_tokens, far away).
LONG_GENERATION = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}


def test_client_disconnect_cancels_generation(live_stack):
    body = {"model": live_stack.model, "stream": True} | LONG_GENERATION
    before, started = _stats(live_stack)["tokens_generated"], time.monotonic()
    with httpx.stream("POST", f"{live_stack.base_url}/v1/completions", json=body, timeout=120) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 5:
                break  # a few tokens in: hang up (leaving the loop closes the stream)
    _assert_stopped_soon(live_stack, before, started, 1000, within_s=1.0)


def test_non_streaming_client_disconnect_cancels_generation(live_stack):
    body = {"model": live_stack.model} | LONG_GENERATION
    before, started = _stats(live_stack)["tokens_generated"], time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_stack.base_url}/v1/completions", json=body, timeout=1.5)  # hangs up while it generates
    # The API layer polls for a disconnect every 0.5 s.
    _assert_stopped_soon(live_stack, before, started, 1000, within_s=1.5)


def test_closing_generate_cancels_the_whole_batch(live_stack):
    """The internal protocol: hanging up on /generate stops every request of the batch."""
    batch = {"requests": [{"id": f"close-{i}", "prompt": p, "max_tokens": 1000, "ignore_eos": True}
                          for i, p in enumerate(("Once upon a time", "The sky is", "def add(a, b):"))]}
    before, started = _stats(live_stack)["tokens_generated"], time.monotonic()
    with httpx.stream("POST", f"{live_stack.backend_url}/generate", json=batch, timeout=120) as r:
        running = set()
        for line in r.iter_lines():
            event = json.loads(line)
            if event["type"] == "delta":
                running.add(event["id"])
            if len(running) == 3:
                assert _stats(live_stack)["active_requests"] == 3
                break  # all three are generating: hang up (leaving the loop closes the stream)
    _assert_stopped_soon(live_stack, before, started, 3000, within_s=1.0)


def test_token_ids_and_seeds_out_of_range_are_400s_before_any_byte(live_stack):
    """Token ids at or past the model's vocabulary (token-array prompts, lists of them, logit_bias keys) and
    seeds outside int64 are refused with a 400 naming the param, streamed or not; the edges are accepted."""
    n_vocab = httpx.get(f"{live_stack.backend_url}/info").json()["n_vocab"]
    base = {"model": live_stack.model, "max_tokens": 2}
    cases = [
        ("/v1/completions", {"prompt": [2, 651, n_vocab]}, "prompt"),
        ("/v1/completions", {"prompt": [[2, 651], [2, n_vocab + 7]]}, "prompt"),
        ("/v1/completions", {"prompt": "Hello", "logit_bias": {str(n_vocab): 5}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logit_bias": {str(n_vocab): 5}},
         "logit_bias"),
        ("/v1/completions", {"prompt": [2, -1]}, "prompt[1]"),
        ("/v1/completions", {"prompt": "Hello", "seed": 2**80}, "seed"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "seed": -(2**63) - 1}, "seed"),
    ]
    for path, body, param in cases:
        for stream in (False, True):
            with httpx.stream("POST", f"{live_stack.base_url}{path}", json=base | body | {"stream": stream},
                              timeout=120) as r:
                raw = r.read().decode()
            assert r.status_code == 400, (path, body, raw)
            assert r.headers["content-type"].startswith("application/json") and "data:" not in raw
            err = json.loads(raw)["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", err
    edges = {"prompt": [[2, n_vocab - 1], [0, 2]], "logit_bias": {"0": -100, str(n_vocab - 1): -100},
             "seed": 2**63 - 1}
    r = post(live_stack, "/v1/completions", base | edges)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2


def test_the_model_server_refuses_what_it_cannot_prepare_per_request(model_service):
    """backend/prepare.py: vocabulary bounds, text that is not Unicode and any failure come back as this
    request's error event, never an exception that would fail its batch."""
    from backend.prepare import PreparedRequest, prepare
    from common.protocol import ErrorEvent, GenerationRequest

    s = model_service
    n_vocab = s.model.n_vocab

    def run(**fields):
        return prepare(s.model, s.template, GenerationRequest(id="p", max_tokens=2, **fields), s.grammars)

    for fields, param in [({"prompt": [2, n_vocab]}, "prompt"), ({"prompt": [-1]}, "prompt"),
                          ({"prompt": "Hi", "logit_bias": {n_vocab: 1.0}}, "logit_bias"),
                          ({"prompt": "a\ud800b"}, "prompt")]:
        ev = run(**fields)
        assert isinstance(ev, ErrorEvent) and ev.code == "invalid_request" and ev.param == param, (fields, ev)
        assert str(n_vocab - 1) in ev.message or param == "prompt" and "Unicode" in ev.message
    assert isinstance(run(prompt=[2, n_vocab - 1], logit_bias={0: 1.0, n_vocab - 1: -1.0}), PreparedRequest)

    class Broken:  # a template that fails unexpectedly: an internal error event, not an exception
        stop: list = []

        def render(self, *a, **k):
            raise RuntimeError("boom")

    ev = prepare(s.model, Broken(), GenerationRequest(id="q", messages=[{"role": "user", "content": "x"}]), s.grammars)
    assert isinstance(ev, ErrorEvent) and ev.code == "internal" and ev.id == "q"
