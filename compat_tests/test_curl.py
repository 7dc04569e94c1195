"""curl, the lowest common denominator: a streaming chat request read as raw SSE."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streaming_chat(live_stack):
    request = {"model": live_stack.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
    body = json.dumps(request | {"stream": True})
    out = subprocess.run(
        ["curl", "-sN", "--fail-with-body", f"{live_stack.base_url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    events = [e for e in out.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    full = httpx.post(f"{live_stack.base_url}/v1/chat/completions", json=request, timeout=120).json()["choices"][0]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == full["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_error_envelope(live_stack):
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"{live_stack.base_url}/v1/completions",
                          "-H", "Content-Type: application/json", "-d", "{oops"],
                         capture_output=True, text=True, timeout=60).stdout
    body, status = out.rsplit("\n", 1)
    err = json.loads(body)["error"]
    assert status == "400" and err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
