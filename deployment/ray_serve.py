"""Ray Serve: model-server replicas as a Serve deployment, the API layer as the Serve ingress that
routes over them with the API's own router (app/replicas.py, app/routing.py).

    python -m deployment.ray_serve --replicas 2 --threads 1 --port 8000      # a local Ray cluster
    RAY_ADDRESS=auto python -m deployment.ray_serve --replicas 4              # an existing cluster

Three deployments:
- `ModelServer`: each replica loads the model (backend/runtime.py) and serves the internal protocol
  on its own HTTP port, as `python -m backend` does; Ray places it by its CPU reservation
  (`num_cpus` = its llama.cpp threads) and scales it on queue length (its running and waiting
  requests, reported with `record_autoscaling_stats`; `QueueLengthPolicy` below). Serve health-
  checks it and replaces a replica that died.
- `Directory`: where each model-server replica listens. Replicas register at start; replicas that
  died are pruned when the list is read.
- `Api`: the API layer (app/main.py) behind Serve's HTTP proxy; its router follows the directory
  every INFO_REFRESH_S and sends each request to a replica chosen by prompt-cache affinity and load,
  over the internal protocol. Serve's own request routing is not in the path: the affinity policy is
  written once, in app/routing.py, and is the same under Ray, compose or a list of URLs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

log = logging.getLogger("deployment.ray_serve")


@serve.deployment(name="Directory", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Directory:
    """Model-server replica -> the URL its internal protocol listens on."""

    def __init__(self):
        self.urls: dict[str, str] = {}  # replica actor name -> URL

    def register(self, actor: str, url: str) -> None:
        self.urls[actor] = url

    def unregister(self, actor: str) -> None:
        self.urls.pop(actor, None)

    def list(self) -> list[str]:
        """The URLs of replicas whose actors are alive (dead ones are forgotten here)."""
        import ray

        for actor in list(self.urls):
            try:
                ray.get_actor(actor, namespace="serve")
            except ValueError:
                self.urls.pop(actor)
        return sorted(self.urls.values())


@serve.deployment(name="ModelServer", max_ongoing_requests=1000, health_check_period_s=2, health_check_timeout_s=20,
                  graceful_shutdown_timeout_s=60)
class ModelServer:
    """One model server: the model loaded in this replica, the internal protocol on its own port."""

    def __init__(self, directory: DeploymentHandle, settings: dict):
        import uvicorn

        from backend.config import BackendSettings
        from backend.runtime import ModelService
        from backend.server import create_app
        from common.drain import Drain
        from common.ports import free_port

        host = settings.get("backend_host") or _node_ip()
        port = free_port()
        self.settings = BackendSettings(**{**settings, "backend_host": host, "backend_port": port})
        self.service = ModelService(self.settings)
        self.url = f"http://{host}:{port}"
        self.drain = Drain(self.settings.shutdown_grace_s)
        config = uvicorn.Config(create_app(self.settings, self.service, self.drain),
                                host="0.0.0.0" if host != "127.0.0.1" else host,
                                port=port, log_level=self.settings.log_level, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="model-server-http", daemon=True)
        self.thread.start()  # the app's lifespan loads the model in the background
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.actor = serve.get_replica_context().replica_id.to_full_id_str()
        self.directory = directory

    async def url_of(self) -> str:
        return self.url

    async def check_health(self) -> None:
        """Serve's health check (every 2 s): the HTTP front and the engine must be alive. It also
        (re-)registers the replica, so a directory that restarted fills up again within seconds."""
        if not self.thread.is_alive():
            raise RuntimeError("the model server's HTTP front stopped")
        h = self.service.health()
        if h.status == "error":
            raise RuntimeError(h.detail)
        if not self.drain.draining:
            await self.directory.register.remote(self.actor, self.url)

    async def __del__(self) -> None:
        """Serve stops this replica (downscale, redeploy): it leaves the directory, refuses new work
        (the router sends it elsewhere) and lets the requests in flight finish, for up to
        SHUTDOWN_GRACE_S; then the HTTP front stops."""
        import asyncio

        self.drain.begin()
        try:
            await self.directory.unregister.remote(self.actor)
        except Exception:  # the directory may be gone already (the whole app shutting down)
            pass
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        engine = self.service.engine
        while engine is not None and engine.scheduler.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.server.should_exit = True

    def record_autoscaling_stats(self) -> dict[str, float]:
        engine = self.service.engine
        if engine is None:
            return {"queued": 0.0}
        return {"queued": float(len(engine.scheduler.running) + len(engine.scheduler.waiting))}


class QueueLengthPolicy:
    """Serve autoscaling policy: enough replicas that each has about `target` requests running or
    waiting, from what the replicas report (ModelServer.record_autoscaling_stats)."""

    def __init__(self, target: float = 4.0):
        self.target = target

    def __call__(self, ctx) -> tuple[int, dict]:
        per_replica = ctx.aggregated_metrics.get("queued", {}) if ctx.aggregated_metrics else {}
        queued = sum(per_replica.values())
        want = math.ceil(queued / self.target) if queued else ctx.capacity_adjusted_min_replicas
        return min(max(want, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas), {}


@serve.deployment(name="Api", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Api:
    """The API layer as Serve's ingress; its router follows the directory of model servers."""

    def __init__(self, directory: DeploymentHandle, model_servers: DeploymentHandle, settings: dict):
        from app.config import AppSettings

        self.directory = directory
        self.model_servers = model_servers  # bound so that Serve deploys them with this app
        self.settings = AppSettings(**settings)

    def __serve_build_asgi_app__(self):
        from app.main import create_app

        async def discover() -> list[str]:
            return await self.directory.list.remote()

        return create_app(self.settings, discover=discover)


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


def build(replicas: int = 2, threads: int = 1, max_replicas: int | None = None, target_queue: int = 4,
          backend: dict | None = None, api: dict | None = None):
    """The Serve application: `replicas` model servers (autoscaled up to `max_replicas` on queue
    length when given), each reserving `threads` CPUs, behind the API ingress."""
    backend = {"threads": threads, **(backend or {})}
    api = {"info_refresh_s": 1.0, **(api or {})}
    directory = Directory.bind()
    options: dict = {"ray_actor_options": {"num_cpus": threads}}
    if max_replicas and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas, "initial_replicas": replicas, "max_replicas": max_replicas,
            "upscale_delay_s": 10, "downscale_delay_s": 120,
            "policy": {"policy_function": QueueLengthPolicy, "policy_kwargs": {"target": target_queue}},
        }
    else:
        options["num_replicas"] = replicas
    models = ModelServer.options(**options).bind(directory, backend)
    return Api.bind(directory, models, api)


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-replicas", type=int, default=0, help="autoscale on queue length up to this many")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica (its CPU reservation)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=os.environ.get("MODEL", "default"))
    args = ap.parse_args()
    logging.basicConfig(level="INFO")
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(args.replicas, args.threads, args.max_replicas or None, backend={"model": args.model}),
              name="llm-serve", route_prefix="/")
    log.info("serving on http://%s:%d (Ctrl-C stops)", args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
