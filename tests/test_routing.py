"""Several model servers behind one API: the routing policy as pure functions, and the router against
model servers mocked at the internal protocol (respx): prompt-cache affinity, load, failover with one
retry for requests that had not started, models of several replicas, /health per replica."""

from __future__ import annotations

import httpx
import pytest
import respx

from app.config import AppSettings
from app.main import create_app
from app.routing import BLOCK_CHARS, Candidate, PrefixMemory, choose, prefix_keys, prompt_text
from common.protocol import ChatMessage, DeltaEvent, DoneEvent, GenerateBatch, GenerationRequest, ModelInfo, PromptEvent

A, B, C = "http://a.test", "http://b.test", "http://c.test"


def info(name: str, created: int = 1) -> ModelInfo:
    return ModelInfo(name=name, path="/m.gguf", n_ctx=4096, n_vocab=1000, n_parallel=4, chat_template="",
                     chat_template_source="transcript", created=created)


# --- the policy ------------------------------------------------------------------------------------
def test_prefix_keys_chain_the_blocks():
    text = "x" * (3 * BLOCK_CHARS + 10)
    keys = prefix_keys(text)
    assert len(keys) == 3 and len(set(keys)) == 3  # same block content, different position: different keys
    assert prefix_keys(text[: 2 * BLOCK_CHARS]) == keys[:2]  # a shorter prompt shares the leading keys
    other = prefix_keys("y" + text[1:])
    assert not set(other) & set(keys)  # a different first block changes every key after it
    chat = GenerationRequest(id="1", messages=[ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")])
    assert prompt_text(chat) == "system\x1fs\x1euser\x1fu"
    assert prompt_text(GenerationRequest(id="2", prompt=[5, 6])) == "5 6"


def test_prefix_memory_matches_leading_keys_and_forgets_the_oldest():
    m = PrefixMemory(capacity=3)
    m.add([b"a", b"b", b"c"])
    assert m.matched([b"a", b"b", b"x"]) == 2 and m.matched([b"x", b"a"]) == 0
    m.add([b"d"])  # "a" was the least recently used
    assert m.matched([b"a"]) == 0 and m.matched([b"b", b"c", b"d"]) == 3


def test_affinity_wins_until_the_holder_is_too_loaded():
    cands = [Candidate("a", load=5, matched=10), Candidate("b", load=2, matched=0), Candidate("c", load=3, matched=4)]
    assert choose(cands, imbalance=4) == "a"  # 5 - 2 = 3 more sequences than the least loaded: still a
    assert choose(cands, imbalance=2) == "b"  # too loaded: the least loaded one
    assert choose([Candidate("a", 3, 2), Candidate("b", 1, 2)], imbalance=4) == "b"  # equal match: less loaded
    # No match anywhere: the least loaded; among equals the tie key decides, the same way each time.
    idle = [Candidate("a", 0, 0), Candidate("b", 0, 0), Candidate("c", 1, 0)]
    assert choose(idle, 4, b"\x00\x00\x00\x01") == "b" and choose(idle, 4, b"\x00\x00\x00\x02") == "a"
    assert choose([], 4) is None


def test_baseline_policies():
    cands = [Candidate("b", 9, 10), Candidate("a", 0, 0)]
    assert [choose(cands, 4, policy="round_robin", turn=t) for t in range(3)] == ["a", "b", "a"]
    assert choose(cands, 100, policy="least_loaded") == "a"  # prefixes ignored
    assert choose(cands, 100) == "b"


# --- the router over mocked model servers -----------------------------------------------------------
def answer(request: httpx.Request, tag: str) -> httpx.Response:
    batch = GenerateBatch.model_validate_json(request.content)
    lines = []
    for r in batch.requests:
        lines += [PromptEvent(id=r.id, prompt_tokens=3), DeltaEvent(id=r.id, index=0, text=tag, token_ids=[1]),
                  DoneEvent(id=r.id, index=0, finish_reason="length", completion_tokens=1)]
    return httpx.Response(200, content="".join(e.model_dump_json() + "\n" for e in lines).encode())


@pytest.fixture
async def stack():
    with respx.mock(assert_all_called=False) as mock:
        for url, model in ((A, "m"), (B, "m"), (C, "other")):
            mock.get(f"{url}/info", name=f"info {url}").respond(200, content=info(model).model_dump_json())
            mock.get(f"{url}/health", name=f"health {url}").respond(200, json={"status": "ok"})
            mock.post(f"{url}/generate", name=f"gen {url}").mock(side_effect=lambda req, u=url: answer(req, u))
            mock.post(f"{url}/cancel").respond(200, json={"cancelled": []})
        app = create_app(AppSettings(backend_urls=f"{A},{B},{C}", max_wait_ms=0, info_refresh_s=60))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
                client.mock, client.app = mock, app
                yield client


async def served_by(client, body: dict) -> str:
    r = await client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 1, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


async def test_a_conversation_stays_on_its_replica_and_models_route_by_name(stack):
    system = {"role": "system", "content": "You are a helpful assistant for a travel agency. " * 6}
    first = await served_by(stack, {"messages": [system, {"role": "user", "content": "Flights to Oslo?"}]})
    turns = [await served_by(stack, {"messages": [system, {"role": "user", "content": "Flights to Oslo?"},
                                                  {"role": "assistant", "content": "Daily."},
                                                  {"role": "user", "content": f"And hotels, {i}?"}]}) for i in range(4)]
    assert first in (A, B) and turns == [first] * 4
    other = await stack.post("/v1/completions", json={"model": "other", "prompt": "hi", "max_tokens": 1})
    assert other.json()["choices"][0]["text"] == C
    models = (await stack.get("/v1/models")).json()["data"]
    assert sorted(m["id"] for m in models) == ["m", "other"]
    missing = await stack.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert missing.status_code == 404 and "'m', 'other'" in missing.json()["error"]["message"]


async def test_a_failed_replica_is_taken_out_and_unstarted_requests_are_retried_once(stack):
    # Warm the router up (model infos), then make A refuse connections.
    await stack.get("/v1/models")
    stack.mock.routes[f"gen {A}"].side_effect = httpx.ConnectError("refused")
    stack.mock.routes[f"info {A}"].side_effect = httpx.ConnectError("refused")
    stack.mock.routes[f"health {A}"].side_effect = httpx.ConnectError("refused")
    answers = [await served_by(stack, {"messages": [{"role": "user", "content": f"question {i} " * 20}]}) for i in range(6)]
    assert answers == [B] * 6  # none lost: any sent to A went to B, once
    assert stack.mock.routes[f"gen {A}"].call_count == 1  # the first try on A failed; after it, A was out
    router = stack.app.state.router
    assert [r.up for r in router.replicas] == [False, True, True]
    health = (await stack.get("/health")).json()
    assert health["status"] == "ok" and [r["status"] for r in health["replicas"]] == ["error", "ok", "ok"]
    # A comes back: the next probe puts it back in rotation.
    stack.mock.routes[f"gen {A}"].side_effect = lambda req: answer(req, A)
    stack.mock.routes[f"info {A}"].side_effect = None
    await router.refresh(router.replicas[0])
    assert router.replicas[0].up is True
    spread = {await served_by(stack, {"messages": [{"role": "user", "content": f"fresh {i} " * 20}]}) for i in range(8)}
    assert A in spread


async def test_without_any_replica_for_the_model_the_answer_is_503(stack):
    stack.mock.routes[f"info {C}"].side_effect = httpx.ConnectError("refused")
    stack.mock.routes[f"gen {C}"].side_effect = httpx.ConnectError("refused")
    await stack.get("/v1/models")
    r = await stack.post("/v1/completions", json={"model": "other", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 503 and r.json()["error"]["type"]


async def test_discovered_replicas_join_and_leave_once_they_stop_answering():
    listed = [A]

    async def discover():
        return list(listed)

    with respx.mock(assert_all_called=False) as mock:
        for url in (A, B):
            mock.get(f"{url}/info", name=f"info {url}").respond(200, content=info("m").model_dump_json())
            mock.post(f"{url}/generate", name=f"gen {url}").mock(side_effect=lambda req, u=url: answer(req, u))
        app = create_app(AppSettings(max_wait_ms=0, info_refresh_s=60), discover=discover)
        router = app.state.router
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
                await router.sync()
                assert [r.url for r in router.replicas] == [A]
                listed.append(B)
                await router.sync()
                for replica in router.replicas:
                    await router.refresh(replica)
                assert [r.url for r in router.replicas] == [A, B] and all(r.up for r in router.replicas)
                listed.remove(B)  # no longer listed but still answering: it keeps serving
                await router.sync()
                assert [r.url for r in router.replicas] == [A, B]
                mock.routes[f"info {B}"].side_effect = httpx.ConnectError("gone")
                await router._probe(router.replicas[1])
                await router.sync()  # listed no more and silent: dropped
                assert [r.url for r in router.replicas] == [A]
                r = await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
                assert r.json()["choices"][0]["text"] == A
