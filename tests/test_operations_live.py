"""Operations on the live stack (both layers as processes, the real default model): /metrics on both
layers and the dashboard's queries, request ids in both logs, clients that leave early, CORS from a
real headless browser, and the drain on SIGTERM."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.ports import free_port
from tests.polling import wait_for
from tests.stack import ROOT, running_stack

KEY = "ops-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PAGE_PORT = free_port()  # the origin the stack admits (CORS_ORIGINS)
DASHBOARD = ROOT / "deployment" / "grafana" / "dashboards" / "llm-serve.json"


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("ops-logs"), LOG_LEVEL="info", API_KEY=KEY,
                       CORS_ORIGINS=f"http://127.0.0.1:{PAGE_PORT}") as stack:
        yield stack


def families(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}


def completion(stack, **body) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/v1/completions", headers=AUTH, timeout=120,
                      json={"model": stack.model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0} | body)


def test_metrics_of_both_layers_move_with_a_request_and_the_dashboard_queries_exist(ops_stack):
    before_api, before_backend = families(ops_stack.base_url), families(ops_stack.backend_url)
    assert completion(ops_stack).status_code == 200
    assert completion(ops_stack, stream=True).status_code == 200
    api, backend = families(ops_stack.base_url), families(ops_stack.backend_url)

    def total(fams, name):
        return sum(s.value for s in fams[name].samples if s.name in (name, f"{name}_total", f"{name}_count"))

    for name in ("llmserve_time_to_first_token_seconds", "llmserve_e2e_request_latency_seconds", "llmserve_batcher_batch_size"):
        assert total(api, name) == total(before_api, name) + 2, name
    assert total(api, "llmserve_generation_tokens") == total(before_api, "llmserve_generation_tokens") + 16
    assert total(backend, "llmserve_generation_tokens") == total(before_backend, "llmserve_generation_tokens") + 16
    assert total(backend, "llmserve_engine_step_seconds") > total(before_backend, "llmserve_engine_step_seconds")
    assert total(backend, "llmserve_request_queue_time_seconds") == total(before_backend, "llmserve_request_queue_time_seconds") + 2
    for name in ("llmserve_prefix_cache_queries", "llmserve_spec_decode_enabled", "llmserve_spec_decode_num_accepted_tokens_per_pos",
                 "llmserve_num_requests_running"):
        assert name in backend, name

    # Every metric a dashboard panel queries is one a layer exports.
    exported = set(api) | set(backend)
    queried = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"llmserve_[a-z0-9_]+", target["expr"]))
    assert queried, "the dashboard queries nothing"
    missing = {q for q in queried if re.sub(r"_(bucket|sum|count|total)$", "", q) not in exported}
    assert not missing, missing


def test_a_request_id_names_the_request_in_both_logs(ops_stack):
    r = httpx.post(
        f"{ops_stack.base_url}/v1/chat/completions", timeout=120, headers=AUTH | {"x-request-id": "trace-me-7"},
        json={"model": ops_stack.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-7"
    # Each layer writes its line once the request is over there, which may be just after the reply.
    assert log_line(ops_stack.log_dir / "api.log",
                    r"app\.access: trace-me-7 POST /v1/chat/completions 200 prompt=\d+ cached=\d+ completion=[1-4] ttft=\d+ms")
    assert log_line(ops_stack.log_dir / "backend.log",
                    r"backend\.server: trace-me-7 \w+ prompt=\d+ cached=\d+ completion=[1-4] finish=(length|stop)")  # sampled: may stop early


def log_line(path, pattern: str, within_s: float = 10.0):
    """The first match of pattern in the log file, waiting up to within_s for it to be written."""
    return wait_for(lambda: re.search(pattern, path.read_text()), within_s, f"{pattern!r} in {path.name}")


def test_clients_that_leave_early_are_one_info_line_not_a_traceback(ops_stack):
    body = {"model": ops_stack.model, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up
        httpx.post(f"{ops_stack.base_url}/v1/completions", json=body, headers=AUTH | {"x-request-id": "leaver-1"}, timeout=1.0)
    with httpx.stream("POST", f"{ops_stack.base_url}/v1/completions", json=body | {"stream": True},
                      headers=AUTH | {"x-request-id": "leaver-2"}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break  # closes the stream
    time.sleep(2.0)
    api_log = (ops_stack.log_dir / "api.log").read_text()
    assert re.search(r"INFO app\.access: leaver-1 POST /v1/completions 499 .*\(client disconnected\)", api_log), api_log[-3000:]
    assert re.search(r"INFO app\.access: leaver-2 POST /v1/completions 200 .*stream \(client disconnected\)", api_log)  # it had started
    assert "Traceback" not in api_log and "Exception in ASGI" not in api_log, api_log[-3000:]
    backend_log = (ops_stack.log_dir / "backend.log").read_text()
    assert re.search(r"leaver-1 \w+ prompt=\d+ cached=\d+ completion=\d+ finish=cancelled", backend_log)


class _Pages(BaseHTTPRequestHandler):
    """Serves the test page and receives what the page's script found."""

    results: list = []

    def do_GET(self):  # noqa: N802
        page = PAGE.replace("API_URL", self.server.api_url).replace("MODEL", self.server.model)
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(page.encode())

    def do_POST(self):  # noqa: N802
        self.results.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


PAGE = """<!doctype html><html><body><script>
const report = (r) => fetch("/result", {method: "POST", body: JSON.stringify({origin: location.origin, ...r})});
fetch("API_URL/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer %s", "Content-Type": "application/json", "x-stainless-lang": "js"},
      body: JSON.stringify({model: "MODEL", messages: [{role: "user", content: "Say hi"}], max_tokens: 4})})
  .then(async (r) => report({status: r.status, request_id: r.headers.get("x-request-id"), body: await r.json()}))
  .catch((e) => report({blocked: String(e)}));
</script></body></html>""" % KEY


def browser_fetch(stack, page_port: int, tmp_path: Path) -> dict:
    """Open a page served from http://127.0.0.1:page_port in headless Chromium; what its fetch found."""
    server = ThreadingHTTPServer(("127.0.0.1", page_port), _Pages)
    server.api_url, server.model = stack.base_url, stack.model
    _Pages.results = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = subprocess.Popen(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / f'chromium-{page_port}'}", f"http://127.0.0.1:{page_port}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wait_for(lambda: _Pages.results, 90, "the page to report", every_s=0.2)[0]
    finally:
        browser.kill()
        browser.wait()
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_a_browser_page_from_an_allowed_origin_calls_the_api_and_others_are_blocked(ops_stack, tmp_path):
    got = browser_fetch(ops_stack, PAGE_PORT, tmp_path)
    assert got.get("status") == 200, got  # preflight (Authorization, JSON, x-stainless-*) then the POST
    assert got["body"]["choices"][0]["message"]["role"] == "assistant" and got["request_id"]
    other = browser_fetch(ops_stack, free_port(), tmp_path)  # an origin CORS_ORIGINS does not list
    assert "blocked" in other and "status" not in other, other


def test_sigterm_drains_a_stream_in_flight_refuses_new_requests_then_stops(tmp_path):
    with running_stack(tmp_path, LOG_LEVEL="info", SHUTDOWN_GRACE_S="60") as stack:
        body = {"model": stack.model, "prompt": "Once upon a time", "max_tokens": 128, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        lines: list[str] = []
        started = threading.Event()

        def stream():
            with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        stack.api.send_signal(signal.SIGTERM)
        stack.backend.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{stack.base_url}/v1/completions", timeout=30,
                             json={"model": stack.model, "prompt": "Hi", "max_tokens": 2})
        health = httpx.get(f"{stack.base_url}/health", timeout=30)
        backend_refused = httpx.post(f"{stack.backend_url}/generate", timeout=30,
                                     json={"requests": [{"id": "late", "prompt": "Hi", "max_tokens": 2}]})
        reader.join(120)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert backend_refused.status_code == 503 and backend_refused.json()["status"] == "draining"
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 128  # the whole answer, not cut
        for proc in (stack.api, stack.backend):
            proc.wait(timeout=20)  # both stop on their own once drained
        logs = (tmp_path / "api.log").read_text() + (tmp_path / "backend.log").read_text()
        assert logs.count("drained: stopping") == 2, logs[-2000:]
