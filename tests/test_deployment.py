"""Deployment files: the compose file is valid and wires health checks; the scripts are runnable."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "deployment" / "docker-compose.yml"


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_structure():
    spec = yaml.safe_load(COMPOSE.read_text())
    backend, api = spec["services"]["model-server"], spec["services"]["api"]
    assert "healthcheck" in backend and "healthcheck" in api
    assert api["depends_on"]["model-server"]["condition"] == "service_healthy"
    assert api["environment"]["BACKEND_URL"] == "http://model-server:8001"
    assert "model-cache:/models" in backend["volumes"] and "model-cache" in spec["volumes"]
    assert (ROOT / backend["build"]["dockerfile"]).is_file()


def test_compose_replicas_profile_routes_over_two_model_servers():
    spec = yaml.safe_load(COMPOSE.read_text())
    one, two, api = spec["services"]["model-server"], spec["services"]["model-server-2"], spec["services"]["api-replicas"]
    assert two["profiles"] == ["replicas"] and api["profiles"] == ["replicas"]
    assert {k: v for k, v in two.items() if k != "profiles"} == one  # the same model server, twice
    assert api["environment"]["BACKEND_URLS"] == "http://model-server:8001,http://model-server-2:8001"
    assert set(api["depends_on"]) == {"model-server", "model-server-2"}


@pytest.mark.skipif(compose_command() is None, reason="no docker compose client on this machine")
def test_docker_compose_config_accepts_the_file():
    out = subprocess.run([*compose_command(), "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         env={**os.environ, "MODEL": "default"})
    assert out.returncode == 0, out.stderr
    assert "model-server" in out.stdout and "service_healthy" in out.stdout


@pytest.mark.parametrize("script", ["serve.sh", "test.sh", "deployment/server-llm.sh", "deployment/api-server.sh",
                                    "scripts/ensure_venv.sh"])
def test_scripts_are_executable_and_parse(script):
    path = ROOT / script
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_backend_and_app_flags_document_the_env_vars():
    import sys

    for module, names in (("backend", ["--backend-port", "--model", "--ctx-size", "--n-parallel", "--threads"]),
                          ("app", ["--port", "--backend-url", "--max-batch-size", "--max-wait-ms", "--max-queue"])):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        for flag in names:
            assert flag in out.stdout
        assert "env " in out.stdout


def test_a_bad_setting_is_one_clear_line_not_a_traceback():
    import sys

    env = {**os.environ, "N_PARALLEL": "20", "BATCH_SIZE": "32"}
    out = subprocess.run([sys.executable, "-m", "backend"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "BATCH_SIZE (32) must be at least 2 x N_PARALLEL (20)" in out.stderr
    out = subprocess.run([sys.executable, "-m", "app", "--max-queue", "0"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 2 and "max_queue" in out.stderr and "Traceback" not in out.stderr


def test_monitoring_profile_scrapes_both_layers_and_provisions_the_dashboard():
    spec = yaml.safe_load(COMPOSE.read_text())
    prom, grafana = spec["services"]["prometheus"], spec["services"]["grafana"]
    assert prom["profiles"] == ["monitoring"] and grafana["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((ROOT / "deployment" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert targets == {"api": ["api:8000"], "model-server": ["model-server:8001"]}
    for mount in grafana["volumes"]:
        assert (COMPOSE.parent / mount.split(":")[0]).exists(), mount
    # Both layers drain on SIGTERM for SHUTDOWN_GRACE_S; compose must wait longer before it kills them.
    for name in ("api", "model-server"):
        service = spec["services"][name]
        grace = int(service["environment"]["SHUTDOWN_GRACE_S"].split(":-")[1].rstrip("}"))
        assert int(service["stop_grace_period"].rstrip("s")) > grace


@pytest.mark.parametrize("env, url", [
    ({}, "http://127.0.0.1:8001"),  # serve.sh's case: nothing set
    ({"BACKEND_PORT": "9"}, "http://127.0.0.1:9"),
    ({"BACKEND_URL": "http://a:1"}, "http://a:1"),
    ({"BACKEND_URL": "http://a:1", "BACKEND_URLS": "http://b:2,http://c:3"}, "http://b:2"),
])
def test_api_server_script_waits_for_the_model_server_it_is_given(env, url):
    """The script runs under `set -u`: every variable it reads may be unset."""
    clean = {k: v for k, v in os.environ.items() if k not in ("BACKEND_URL", "BACKEND_URLS", "BACKEND_PORT")}
    proc = subprocess.Popen([str(ROOT / "deployment" / "api-server.sh")], env={**clean, **env}, cwd=ROOT,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        first = proc.stderr.readline()
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert first.strip() == f"waiting for the model server at {url} ...", first


def test_ensure_venv_refuses_an_unknown_gpu_kind():
    r = subprocess.run(["scripts/ensure_venv.sh", "requirements.txt"], cwd=ROOT, env={**os.environ, "GPU": "rocm"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "GPU must be 'cuda'" in r.stderr
