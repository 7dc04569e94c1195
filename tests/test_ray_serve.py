"""Ray Serve for real (deployment/ray_serve.py): a local Ray cluster started here, two model-server
replicas of the default model behind the API ingress, requests through the OpenAI SDK; one replica
killed, traffic goes on, and Serve brings a replacement that the router takes into rotation.
Runs when `ray[serve]` is installed (requirements-test.txt has it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.polling import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def healthy_replicas(base: str) -> int:
    import httpx

    try:
        h = httpx.get(f"{base}/health", timeout=10)
    except httpx.HTTPError:
        return 0
    return sum(r["status"] == "ok" for r in h.json().get("replicas", [])) if h.status_code in (200, 503) else 0


@pytest.fixture(scope="module")
def cluster():
    from common.ports import free_port
    from deployment.ray_serve import build

    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway local cluster: no token authentication
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    backend = {"ctx_size": 1024, "n_parallel": 2, "embeddings": False, "log_level": "warning"}
    serve.run(build(replicas=2, threads=1, backend=backend), name="llm-serve", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy_replicas(base) == 2, 240, "two model-server replicas", every_s=1)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_sdk_and_survive_one_being_killed(cluster):
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    # Greedy answers are the same whichever replica serves them (different prompts spread over both).
    answers = {client.completions.create(model=model, prompt=f"Item {i}: The capital of France is", max_tokens=6,
                                         temperature=0).choices[0].text for i in range(2)}
    assert all(isinstance(a, str) and a for a in answers)
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                          max_tokens=12, temperature=0)
    again = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                           max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == again.choices[0].message.content and "Paris" in chat.choices[0].message.content
    before = {r["url"] for r in httpx.get(f"{cluster}/health").json()["replicas"]}
    assert len(before) == 2

    # Kill one model-server replica (its actor: the model server and its HTTP front die with it).
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::llm-serve#ModelServer#")]
    assert len(names) == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    # Traffic continues at once: requests the dead replica would have taken go to the other one.
    for i in range(6):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Say hello, number {i}."}],
                                           max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
    # Serve replaces the replica; the router finds the new one through the directory.
    wait_for(lambda: healthy_replicas(cluster) == 2, 240, "the replacement replica", every_s=1)
    after = {r["url"] for r in httpx.get(f"{cluster}/health").json()["replicas"] if r["status"] == "ok"}
    assert len(after) == 2 and after != before


def test_the_autoscaling_policy_follows_queue_length():
    from types import SimpleNamespace

    from deployment.ray_serve import QueueLengthPolicy

    policy = QueueLengthPolicy(target=4)

    def ctx(queued: list[float]):
        return SimpleNamespace(aggregated_metrics={"queued": {f"r{i}": q for i, q in enumerate(queued)}},
                               capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4)

    assert policy(ctx([0, 0]))[0] == 1  # idle: the minimum
    assert policy(ctx([4, 5]))[0] == 3  # 9 queued, 4 per replica
    assert policy(ctx([30, 30]))[0] == 4  # capped at the maximum
