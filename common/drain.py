"""Graceful drain, shared by both layers: on SIGTERM (or Ctrl-C) a server stops admitting work,
lets the requests in flight finish for up to a grace period, then stops.

Uvicorn's own shutdown closes the listening socket at once, so a client (or a load balancer that
has not noticed yet) gets "connection refused" and cannot tell a restart from a crash. Here the
socket stays open while draining: new requests get a 503 with Retry-After (the layer says how),
`/health` reports "draining" so a balancer takes the server out, and the streams in flight run to
their end. A second signal stops at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("drain")


class Drain:
    """Whether the server admits work, and how many admitted requests are still running."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.draining = False
        self.in_flight = 0
        self._changed = asyncio.Event()

    def begin(self) -> None:
        self.draining = True
        self._changed.set()

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        self._changed.set()

    async def wait_idle(self) -> bool:
        """Wait until nothing is in flight or the grace period ends: whether it emptied in time."""
        deadline = time.monotonic() + self.grace_s
        while self.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                pass
        return True


class DrainMiddleware:
    """Counts requests in flight on the guarded paths (a streamed response counts until its last
    byte) and, while draining, answers new ones with `refuse(scope)` instead of running them."""

    def __init__(self, app: ASGIApp, drain: Drain, guarded: Callable[[str], bool], refuse: Callable[[Scope], ASGIApp]):
        self.app = app
        self.drain = drain
        self.guarded = guarded
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guarded(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self.refuse(scope)(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before uvicorn's own shutdown starts."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain.draining or self.drain.grace_s <= 0:
            super().handle_exit(sig, frame)  # a second signal, or no grace: uvicorn's shutdown now
            return
        self.drain.begin()
        log.info("draining: refusing new requests, %d in flight, grace %.0f s", self.drain.in_flight, self.drain.grace_s)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame) -> None:
        if await self.drain.wait_idle():
            log.info("drained: stopping")
        else:
            log.warning("grace period over with %d request(s) in flight: stopping", self.drain.in_flight)
        super().handle_exit(sig, frame)


def serve(app, drain: Drain, **config) -> None:
    """uvicorn.run with the drain: the final shutdown has little left to wait for, so it is bounded.
    The event loop and HTTP parser are the standard library's and h11 wherever it runs: uvicorn would
    take uvloop and httptools when installed (ray[serve] pulls them into the test environment), and
    the servers must behave the same in tests and in the image, which has neither."""
    config = {"loop": "asyncio", "http": "h11", **config}
    server = DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=5, **config), drain)
    server.run()
