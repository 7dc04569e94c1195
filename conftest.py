"""Fixtures shared by tests/ and compat_tests/: the real default model, in-process and as a live stack."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.ports import free_port

ROOT = Path(__file__).parent


@pytest.fixture(scope="session")
def model_service():
    """The real default model loaded in-process, engine thread running, plain decoding (no Medusa)."""
    from backend.config import BackendSettings
    from backend.runtime import ModelService

    service = ModelService(BackendSettings(ctx_size=1024, n_parallel=4, threads=2, medusa_heads="none"))
    service.load()
    assert service.error is None, service.error
    yield service
    service.engine.shutdown()


@dataclass
class LiveStack:
    base_url: str  # the API layer, e.g. http://127.0.0.1:PORT
    backend_url: str
    model: str
    log_dir: Path


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    """Both layers as separate processes on free ports, through the same entry points as deployment/."""
    from common.wait_ready import wait_ready

    logs = tmp_path_factory.mktemp("stack-logs")
    backend_port, api_port = free_port(), free_port()
    env = {**os.environ, "BACKEND_PORT": str(backend_port), "PORT": str(api_port), "HOST": "127.0.0.1",
           "CTX_SIZE": "1024", "N_PARALLEL": "4", "THREADS": "2", "LOG_LEVEL": "warning"}
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

        model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        yield LiveStack(base_url=base_url, backend_url=backend_url, model=model, log_dir=logs)
    finally:
        for proc in (api, backend):
            proc.terminate()
        for proc in (api, backend):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
