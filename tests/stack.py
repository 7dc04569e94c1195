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
    backend_url: str
    model: str
    log_dir: Path
    backend: subprocess.Popen | None = None
    api: subprocess.Popen | None = None


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


@contextmanager
def running_stack(logs: Path, **settings: str) -> Iterator[LiveStack]:
    """Both layers as separate processes on free ports, through the same entry points as deployment/;
    `settings` are extra env vars (e.g. API_KEY="k"). Stopped with SIGTERM (the drain) on exit."""
    from common.wait_ready import wait_ready

    backend_port, api_port = free_port(), free_port()
    env = {**os.environ, "BACKEND_PORT": str(backend_port), "PORT": str(api_port), "HOST": "127.0.0.1",
           "CTX_SIZE": "1024", "N_PARALLEL": "4", "THREADS": "2", "LOG_LEVEL": "warning", **settings}
    env.pop("BACKEND_URL", None)
    backend = _start(["backend"], env, logs / "backend.log")
    api = _start(["app"], env, logs / "api.log")
    backend_url, base_url = f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{api_port}"
    try:
        for url, proc in ((backend_url, backend), (base_url, api)):
            problem = wait_ready(url, timeout_s=120)
            if problem:
                raise RuntimeError(f"{problem}; logs in {logs}")
        import httpx

        headers = {"Authorization": f"Bearer {settings['API_KEY'].split(',')[0]}"} if settings.get("API_KEY") else {}
        model = httpx.get(f"{base_url}/v1/models", headers=headers).json()["data"][0]["id"]
        yield LiveStack(base_url=base_url, backend_url=backend_url, model=model, log_dir=logs, backend=backend, api=api)
    finally:
        for proc in (api, backend):
            proc.terminate()
        for proc in (api, backend):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
