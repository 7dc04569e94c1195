"""curl, the lowest common denominator: a streaming chat request read as raw SSE."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streaming_chat(live_stack):
    body = json.dumps({"model": live_stack.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True})
    out = subprocess.run(
        ["curl", "-sN", "--fail-with-body", f"{live_stack.base_url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    events = [e for e in out.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_error_envelope(live_stack):
    out = subprocess.run(["curl", "-s", f"{live_stack.base_url}/v1/completions", "-H", "Content-Type: application/json",
                          "-d", "{oops"], capture_output=True, text=True, timeout=60).stdout
    assert json.loads(out)["error"]["type"] == "invalid_request_error"
