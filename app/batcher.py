"""The dynamic batcher: collects generation requests and forwards them to the model server in batches.

A batch leaves when it holds `max_batch_size` requests or when its oldest request has waited
`max_wait_ms`. A request that finds the model server idle (nothing in flight) leaves at once, so one
user alone never pays the window. At most `max_queue` requests are admitted at once; past that,
`submit` raises TooManyRequests (429 with Retry-After).

Events of each request go to the asyncio.Queue its submitter handed in; a failure of the model
server arrives there as an APIError instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from app.backend_client import BackendClient
from app.errors import APIError, BackendUnavailable, TooManyRequests
from common.protocol import DoneEvent, ErrorEvent, GenerateBatch, GenerationRequest

log = logging.getLogger("app.batcher")


@dataclass
class _Pending:
    req: GenerationRequest
    out: asyncio.Queue
    enqueued: float = field(default_factory=time.monotonic)
    choices_left: int = 0


class DynamicBatcher:
    def __init__(self, client: BackendClient, max_batch_size: int = 4, max_wait_ms: float = 100.0, max_queue: int = 256):
        self.client = client
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._waiting: list[_Pending] = []
        self._in_flight: dict[str, _Pending] = {}  # sent to the model server, not finished
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        for t in [self._task, *self._batches]:
            if t is not None:
                t.cancel()

    @property
    def admitted(self) -> int:
        return len(self._waiting) + len(self._in_flight)

    def submit(self, reqs: list[GenerationRequest], out: asyncio.Queue) -> None:
        """Queue requests; their events (and errors) will be put on `out`."""
        if self.admitted + len(reqs) > self.max_queue:
            raise TooManyRequests(
                f"The server is at capacity ({self.max_queue} requests admitted); retry shortly.", retry_after_s=1
            )
        for r in reqs:
            self._waiting.append(_Pending(r, out, choices_left=r.n))
        self._wake.set()

    def cancel(self, ids: list[str]) -> None:
        """Drop waiting requests and tell the model server to stop sent ones. Never blocks, so it is
        safe in the cleanup of a request whose client went away (where awaiting would be cancelled)."""
        ids_set = set(ids)
        self._waiting = [p for p in self._waiting if p.req.id not in ids_set]
        sent = [i for i in ids if self._in_flight.pop(i, None) is not None]
        if sent:
            task = asyncio.get_running_loop().create_task(self.client.cancel(sent))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _collect(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._in_flight and len(self._waiting) < self.max_batch_size:
                # The model server is busy: give the batch until its oldest request's deadline to fill.
                deadline = self._waiting[0].enqueued + self.max_wait_s
                while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=left)
                    except TimeoutError:
                        break
                if not self._waiting:
                    continue
            batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size :]
            for p in batch:
                self._in_flight[p.req.id] = p
            task = asyncio.create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Pending]) -> None:
        by_id = {p.req.id: p for p in batch}
        try:
            async for ev in self.client.generate(GenerateBatch(requests=[p.req for p in batch])):
                p = by_id.get(ev.id)
                if p is None:
                    continue
                p.out.put_nowait(ev)
                if isinstance(ev, ErrorEvent) or (isinstance(ev, DoneEvent) and _last_choice(p)):
                    self._in_flight.pop(ev.id, None)
                    by_id.pop(ev.id)
        except APIError as e:
            self._fail(by_id.values(), e)
        except Exception as e:  # a malformed stream must not leave clients waiting forever
            log.exception("batch failed")
            self._fail(by_id.values(), BackendUnavailable(f"The model server stream failed: {type(e).__name__}"))
        else:
            if by_id:
                self._fail(by_id.values(), BackendUnavailable("The model server ended the stream early."))

    def _fail(self, pending, err: APIError) -> None:
        for p in list(pending):
            if self._in_flight.pop(p.req.id, None) is not None:
                p.out.put_nowait(err)


def _last_choice(p: _Pending) -> bool:
    p.choices_left -= 1
    return p.choices_left <= 0
