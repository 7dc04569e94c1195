"""A live stack for tests: both layers as separate processes on free ports, through the same entry
points as deployment/ (conftest's `live_stack` fixture, and tests that need their own settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.ports import free_port

ROOT = Path(__file__).parent.parent


@dataclass
class LiveStack:
    base_url: str  # the API layer, e.g. http://127.0.0.1:PORT
    backend_url: str  # the (first) model server
    model: str
    log_dir: Path
    backend: subprocess.Popen | None = None
    api: subprocess.Popen | None = None
    backend_urls: tuple[str, ...] = ()  # every model server (replicas=2: two)
    backends: tuple[subprocess.Popen, ...] = ()


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


@contextmanager
def running_stack(logs: Path, replicas: int = 1, **settings: str) -> Iterator[LiveStack]:
    """Both layers as separate processes on free ports, through the same entry points as deployment/;
    `replicas` model servers (the API routes over them with BACKEND_URLS); `settings` are extra env
    vars (e.g. API_KEY="k"). Stopped with SIGTERM (the drain) on exit."""
    from common.wait_ready import wait_ready

    backend_ports, api_port = [free_port() for _ in range(replicas)], free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "CTX_SIZE": "1024", "N_PARALLEL": "4",
           "THREADS": "2" if replicas == 1 else "1", "LOG_LEVEL": "warning", **settings}
    env.pop("BACKEND_URL", None)
    backend_urls = [f"http://127.0.0.1:{p}" for p in backend_ports]
    backends = [_start(["backend"], {**env, "BACKEND_PORT": str(p)}, logs / f"backend{i or ''}.log")
                for i, p in enumerate(backend_ports)]
    api_env = {**env, "PORT": str(api_port), "BACKEND_PORT": str(backend_ports[0])}
    if replicas > 1:
        api_env["BACKEND_URLS"] = ",".join(backend_urls)
    api = _start(["app"], api_env, logs / "api.log")
    base_url = f"http://127.0.0.1:{api_port}"
    try:
        for url in [*backend_urls, base_url]:
            problem = wait_ready(url, timeout_s=120)
            if problem:
                raise RuntimeError(f"{problem}; logs in {logs}")
        import httpx

        headers = {"Authorization": f"Bearer {settings['API_KEY'].split(',')[0]}"} if settings.get("API_KEY") else {}
        model = httpx.get(f"{base_url}/v1/models", headers=headers).json()["data"][0]["id"]
        yield LiveStack(base_url=base_url, backend_url=backend_urls[0], model=model, log_dir=logs, backend=backends[0],
                        api=api, backend_urls=tuple(backend_urls), backends=tuple(backends))
    finally:
        for proc in (api, *backends):
            proc.terminate()
        for proc in (api, *backends):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
