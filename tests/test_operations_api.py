"""Operations of the API layer with the model server mocked at the protocol (respx): API keys, CORS,
request ids and the access log, /metrics, the drain, and noticing a model-server restart."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import httpx
import pytest
import respx
from prometheus_client.parser import text_string_to_metric_families

from prometheus_client import generate_latest

from app.access import ApiKeys
from app.backend_client import BackendClient
from app.batcher import DynamicBatcher
from app.config import AppSettings
from app.errors import TooManyRequests
from app.main import create_app
from app.metrics import ApiMetrics
from common.drain import Drain
from common.protocol import GenerationRequest
from tests.test_api_mocked import BACKEND, INFO, MODEL, fake_generate, sent_requests

COMPLETION = {"model": MODEL, "prompt": "x", "max_tokens": 2}


@asynccontextmanager
async def api_with(**settings):
    with respx.mock(base_url=BACKEND, assert_all_called=False) as mock:
        mock.get("/info", name="info").respond(200, content=INFO.model_dump_json())
        mock.get("/health").respond(200, json={"status": "ok"})
        mock.post("/generate", name="generate").mock(side_effect=fake_generate)
        mock.post("/cancel").respond(200, json={"cancelled": []})
        app = create_app(AppSettings(backend_url=BACKEND, max_wait_ms=0, **settings), BackendClient(BACKEND))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client:
                client.mock, client.app = mock, app
                yield client


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_api_keys_accept_any_listed_key_and_nothing_else():
    keys = ApiKeys(["alpha", "beta-key"])
    assert keys.allows("Bearer alpha") and keys.allows("Bearer beta-key") and keys.allows("bearer  alpha")
    for bad in (None, "", "Bearer", "Bearer alph", "Bearer alphaa", "Basic alpha", "alpha", "Bearer beta"):
        assert not keys.allows(bad), bad
    assert ApiKeys([]).allows(None)  # no keys: open


async def test_keys_from_the_env_list_and_the_file_guard_the_api_but_not_health_or_metrics(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n")
    async with api_with(api_key="env-a, env-b", api_key_file=str(key_file)) as api:
        for key in ("env-a", "env-b", "file-key-1", "file-key-2"):
            r = await api.post("/v1/completions", json=COMPLETION, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (key, r.text)
        for headers in ({}, {"Authorization": "Bearer # team keys"}, {"Authorization": "Bearer env-a,env-b"}):
            r = await api.post("/v1/completions", json=COMPLETION, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "invalid_api_key"
        assert (await api.get("/v1/models")).status_code == 401
        assert (await api.get("/health")).status_code == 200
        assert (await api.get("/metrics")).status_code == 200
    async with api_with(api_key="k", metrics_require_key=True) as api:
        assert (await api.get("/metrics")).status_code == 401
        assert (await api.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200


async def test_cors_answers_preflights_for_listed_origins_only():
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    async with api_with(cors_origins="http://app.example", api_key="k") as api:
        r = await api.options("/v1/chat/completions", headers=preflight)  # no key: preflights never carry one
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
        r = await api.options("/v1/chat/completions", headers=preflight | {"Origin": "http://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await api.post("/v1/completions", json=COMPLETION,
                           headers={"Origin": "http://app.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = await api.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://app.example"  # readable
    async with api_with() as api:  # CORS off: a preflight is just an OPTIONS the route does not have
        r = await api.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


async def test_request_id_is_echoed_sent_to_the_model_server_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="app.access")
    async with api_with() as api:
        r = await api.post("/v1/completions", json=COMPLETION, headers={"x-request-id": "client-id-42"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-42"
        assert sent_requests(api)[0].request_id == "client-id-42"
        r = await api.post("/v1/completions", json=COMPLETION | {"stream": True})
        generated = r.headers["x-request-id"]
        assert len(generated) == 32 and sent_requests(api)[0].request_id == generated
        r = await api.post("/v1/completions", json=COMPLETION, headers={"x-request-id": "bad id\twith spaces"})
        assert r.headers["x-request-id"] != "bad id\twith spaces"  # not echoed into headers and logs
        r = await api.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"x-request-id": "e-1"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "e-1"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "app.access"]
    assert any(line.startswith("client-id-42 POST /v1/completions 200 prompt=3 cached=0 completion=2 ttft=") for line in lines), lines
    assert any(line.startswith(f"{generated} POST /v1/completions 200") and line.endswith("stream") for line in lines), lines
    assert any(line.startswith("e-1 POST /v1/completions 404") for line in lines), lines


async def test_metrics_count_requests_tokens_latencies_and_batches():
    async with api_with() as api:
        for body in (COMPLETION, COMPLETION | {"stream": True}, {"model": "nope", "prompt": "x"}):
            await api.post("/v1/completions", json=body)
        await api.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2})
        r = await api.post("/v1/completions", json=COMPLETION | {"prompt": "busy"})  # the model server is overloaded
        assert r.status_code == 429
        text = (await api.get("/metrics")).text
    m = samples(text)
    assert m[("llmserve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 2
    assert m[("llmserve_requests_total", (("endpoint", "/v1/completions"), ("status", "404")))] == 1
    assert m[("llmserve_requests_total", (("endpoint", "/v1/completions"), ("status", "429")))] == 1
    assert m[("llmserve_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert m[("llmserve_rejected_requests_total", (("reason", "overloaded"),))] == 1
    assert m[("llmserve_prompt_tokens_total", ())] == 9  # 3 per request that reached the model server
    assert m[("llmserve_generation_tokens_total", ())] == 2 + 2 + 4  # the chat request had 2 choices
    assert m[("llmserve_time_to_first_token_seconds_count", ())] == 3
    assert m[("llmserve_e2e_request_latency_seconds_count", ())] == 3
    assert m[("llmserve_inter_token_latency_seconds_count", ())] == 1 + 1 + 2  # one gap per choice
    assert m[("llmserve_batcher_batch_size_count", ())] == 4 and m[("llmserve_request_queue_time_seconds_count", ())] == 4
    assert m[("llmserve_num_requests_running", ())] == 0 and m[("llmserve_num_requests_waiting", ())] == 0
    assert m[("llmserve_backend_up", (("replica", BACKEND),))] == 1


async def test_a_full_batcher_queue_counts_as_rejected():
    metrics = ApiMetrics()
    batcher = DynamicBatcher(BackendClient(BACKEND), max_queue=1, metrics=metrics)
    batcher.submit([GenerationRequest(id="a", prompt="x")], asyncio.Queue())
    with pytest.raises(TooManyRequests):
        batcher.submit([GenerationRequest(id="b", prompt="x")], asyncio.Queue())
    assert samples(generate_latest(metrics.registry).decode())[("llmserve_rejected_requests_total", (("reason", "queue_full"),))] == 1


async def test_a_draining_api_refuses_new_work_with_503_and_says_so_on_health():
    async with api_with() as api:
        api.app.state.drain.begin()
        r = await api.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "server_shutting_down"
        assert (await api.get("/health")).json()["status"] == "draining"
        assert (await api.get("/metrics")).status_code == 200  # still observable while draining
        assert not api.mock.routes["generate"].called


async def test_a_model_server_restart_is_noticed_and_what_was_cached_refreshed():
    async with api_with(info_refresh_s=0.05) as api:
        assert (await api.get("/v1/models")).json()["data"][0]["id"] == MODEL
        restarted = INFO.model_copy(update={"name": "other-model", "n_parallel": 2, "created": 99})
        api.mock.routes["info"].respond(200, content=restarted.model_dump_json())
        for _ in range(100):
            await asyncio.sleep(0.02)
            if api.app.state.router.replicas[0].batcher.capacity == 2:
                break
        assert api.app.state.router.replicas[0].batcher.capacity == 2
        assert (await api.get("/v1/models")).json()["data"][0]["id"] == "other-model"
        r = await api.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 404 and "other-model" in r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_requests_still_work_with_every_operations_feature_on(path):
    body = COMPLETION if path == "/v1/completions" else {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    async with api_with(api_key="k", cors_origins="*") as api:
        r = await api.post(path, json=body, headers={"Authorization": "Bearer k", "Origin": "http://x.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


async def test_drain_waits_for_requests_in_flight_up_to_the_grace_period():
    drain = Drain(grace_s=2.0)
    drain.enter()
    drain.begin()
    asyncio.get_running_loop().call_later(0.1, drain.leave)
    started = time.monotonic()
    assert await drain.wait_idle() and time.monotonic() - started < 1.0  # it ended when the request did
    drain = Drain(grace_s=0.2)
    drain.enter()
    drain.begin()
    assert not await drain.wait_idle()  # the grace period ran out with a request in flight


async def test_embeddings_past_max_queue_get_429_and_the_slot_frees():
    release = asyncio.Event()

    async def slow_embed(request):
        await release.wait()
        return httpx.Response(200, json={"vectors": [[1.0, 0.0]], "prompt_tokens": 2})

    async with api_with(max_queue=1) as api:
        api.mock.post("/embed").mock(side_effect=slow_embed)
        body = {"model": MODEL, "input": "hello"}
        first = asyncio.create_task(api.post("/v1/embeddings", json=body))
        await asyncio.sleep(0.1)
        busy = await api.post("/v1/embeddings", json=body)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        release.set()
        assert (await first).status_code == 200
        assert (await api.post("/v1/embeddings", json=body)).status_code == 200  # its place freed
