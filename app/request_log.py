"""Per-request bookkeeping of the API layer: the request id, one access-log line, and the request
metrics (status, latencies, tokens).

`RequestLogMiddleware` (pure ASGI, so streamed responses are timed to their last byte) gives every
HTTP request a `RequestRecord` in `request.state.record`: the id is the client's `x-request-id` when
it sends a usable one, else a new one, and it goes back in the response's `x-request-id` header and
to the model server with each generation request (its log lines carry it too). `Generation` feeds
the record the prompt and token events; the middleware writes the access line when the response
ends. A client that leaves early is an info line (status 499, nginx's "client closed request").
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import ApiMetrics
from common.protocol import PromptEvent

log = logging.getLogger("app.access")

CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection before the answer
_USABLE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # safe to echo in a header and a log line
# Endpoint labels are route templates, never raw paths: a scanner cannot blow up the label set.
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/messages",
              "/v1/messages/count_tokens", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _USABLE_ID.match(given):
                return given
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    metrics: ApiMetrics | None = None
    arrived: float = field(default_factory=time.perf_counter)
    status: int | None = None
    stream: bool = False
    left_early: bool = False  # a stream whose client went away before its end
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    _last_token: dict = field(default_factory=dict)  # (request id, choice) -> perf_counter of its last tokens

    def on_prompt(self, ev: PromptEvent) -> None:
        self.prompt_tokens += ev.prompt_tokens
        self.cached_tokens += ev.cached_tokens
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(ev.prompt_tokens)

    def on_tokens(self, key: tuple[str, int], n: int) -> None:
        """n tokens of one choice arrived now."""
        if n <= 0:
            return
        now = time.perf_counter()
        self.completion_tokens += n
        last = self._last_token.get(key)
        self._last_token[key] = now
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(n)
            if last is not None:
                self.metrics.itl.observe(now - last)
        if self.ttft is None:
            self.ttft = now - self.arrived
            if self.metrics is not None:
                self.metrics.ttft.observe(self.ttft)

    def on_finished(self) -> None:
        """Every choice is done: the request's end-to-end latency."""
        if self.metrics is not None:
            self.metrics.e2e.observe(time.perf_counter() - self.arrived)

    def line(self) -> str:
        took = time.perf_counter() - self.arrived
        parts = [self.request_id, self.method, self.path, str(self.status)]
        if self.prompt_tokens or self.completion_tokens:
            parts += [f"prompt={self.prompt_tokens}", f"cached={self.cached_tokens}", f"completion={self.completion_tokens}"]
        if self.ttft is not None:
            parts.append(f"ttft={self.ttft * 1000:.0f}ms")
        parts.append(f"total={took * 1000:.0f}ms")
        if self.stream:
            parts.append("stream")
        return " ".join(parts)


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics | None = None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id_from(scope), scope["method"], scope["path"], self.metrics)
        scope.setdefault("state", {})["record"] = record
        header = (b"x-request-id", record.request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            status = record.status or CLIENT_CLOSED  # nothing was sent: the client left first
            if self.metrics is not None:
                self.metrics.requests.labels(endpoint_label(scope["path"]), str(status)).inc()
            if status == CLIENT_CLOSED or record.left_early:
                record.status = status
                log.info("%s (client disconnected)", record.line())
            elif scope["path"] not in ("/health", "/metrics"):  # probes every few seconds would drown the log
                log.info("%s", record.line())
