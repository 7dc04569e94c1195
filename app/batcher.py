"""The dynamic batcher: collects generation requests and forwards them to the model server in batches.

The batcher never holds a request that a free slot could start. It knows the model server's
capacity in sequences (`capacity`, ModelInfo.n_parallel, pushed by the ModelRegistry) and the
sequences in flight (per sent request, its choices not yet done: a request with n choices takes n
slots until its done events or an error free them). Policy, re-applied whenever a request arrives,
a slot frees or the capacity changes:

- The waiting requests that free slots can start leave at once: in arrival order, each that fits
  (its n <= the slots still free) joins the batch, up to `max_batch_size` per batch. An n above the
  capacity counts as the whole capacity, so it goes to an idle server, which refuses it.
- The others wait for the window: they leave as a batch when `max_batch_size` of them wait or when
  the oldest has waited `max_wait_ms`, whether or not slots are free (the model server queues them).
- Capacity unknown (no model info yet): only an idle server is known to have room, so waiting
  requests leave at once (up to `max_batch_size`) when nothing is in flight; otherwise the window.

At most `max_queue` requests are admitted at once; past that, `submit` raises TooManyRequests
(429 with Retry-After).

Events of each request go to the asyncio.Queue its submitter handed in; a failure of the model
server arrives there as an APIError instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.backend_client import BackendClient
from app.errors import APIError, BackendUnavailable, TooManyRequests
from app.metrics import ApiMetrics
from common.protocol import DoneEvent, GenerateBatch, GenerationRequest, RequestProgress

log = logging.getLogger("app.batcher")


@dataclass
class _Pending:
    req: GenerationRequest
    out: asyncio.Queue
    progress: RequestProgress
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False  # an event of it arrived from the model server
    retried: bool = False  # sent once more after a model server failed before it started


class DynamicBatcher:
    def __init__(self, client: BackendClient, max_batch_size: int = 4, max_wait_ms: float = 100.0, max_queue: int = 256,
                 capacity: int | None = None, metrics: ApiMetrics | None = None):
        self.client = client
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.capacity = capacity  # sequences the model server decodes at once; None: not known yet
        self._waiting: list[_Pending] = []
        self._in_flight: dict[str, _Pending] = {}  # sent to the model server, not finished
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        # Called with the requests of a failed batch that had not started, and the error: returns those
        # it could not send elsewhere (app/replicas.py sends them, once, to another model server).
        self.reroute: Callable[[list[_Pending], APIError], list[_Pending]] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        for t in [self._task, *self._batches]:
            if t is not None:
                t.cancel()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake.set()  # waiting requests may fit now

    @property
    def admitted(self) -> int:
        return len(self._waiting) + len(self._in_flight)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    @property
    def busy_slots(self) -> int:
        return sum(p.progress.choices_left for p in self._in_flight.values())

    @property
    def waiting_sequences(self) -> int:
        return sum(p.req.n for p in self._waiting)

    def check_room(self, n: int) -> None:
        """Raise TooManyRequests (429) unless n more requests may be admitted."""
        if self.admitted + n > self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected.labels("queue_full").inc()
            raise TooManyRequests(
                f"The server is at capacity ({self.max_queue} requests admitted); retry shortly.", retry_after_s=1
            )

    def submit(self, reqs: list[GenerationRequest], out: asyncio.Queue) -> None:
        """Queue requests; their events (and errors) will be put on `out`."""
        self.check_room(len(reqs))
        for r in reqs:
            self._waiting.append(_Pending(r, out, RequestProgress(r.n)))
        self._wake.set()

    def abort(self, err: APIError) -> None:
        """This model server is gone: stop its batch streams and end every request here with `err`
        (those not started go to `reroute` first, as for a failed batch)."""
        for t in list(self._batches):
            t.cancel()
        waiting, self._waiting = self._waiting, []
        for p in waiting:
            self._in_flight[p.req.id] = p  # so that _fail sees them as this batcher's
        self._fail([*self._in_flight.values()], err)

    def resubmit(self, p: _Pending) -> None:
        """A request another batcher's model server failed before it started: first in line here."""
        p.enqueued = time.monotonic()
        self._waiting.insert(0, p)
        self._wake.set()

    def cancel(self, ids: list[str]) -> None:
        """Drop waiting requests and tell the model server to stop sent ones. Never blocks, so it is
        safe in the cleanup of a request whose client went away (where awaiting would be cancelled)."""
        ids_set = set(ids)
        self._waiting = [p for p in self._waiting if p.req.id not in ids_set]
        sent = [i for i in ids if self._in_flight.pop(i, None) is not None]
        if sent:
            self._wake.set()  # their slots are free for waiting requests
            task = asyncio.get_running_loop().create_task(self.client.cancel(sent))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _startable(self) -> list[_Pending]:
        """The waiting requests free slots can start now, in arrival order, at most one batch."""
        if self.capacity is None:  # unknown capacity: only an idle server is known to have room
            return [] if self._in_flight else self._waiting[: self.max_batch_size]
        free = self.capacity - self.busy_slots
        batch = []
        for p in self._waiting:
            # n above the capacity never fits: it goes once the server is idle, to be refused there.
            need = min(p.req.n, self.capacity)
            if need <= free:
                batch.append(p)
                free -= need
                if len(batch) == self.max_batch_size:
                    break
        return batch

    async def _collect(self) -> None:
        while True:
            self._wake.clear()
            batch = self._startable()
            windowed = not batch
            if not batch and self._waiting:
                # No room for them: the window gathers a batch until the oldest one's deadline.
                left = self._waiting[0].enqueued + self.max_wait_s - time.monotonic()
                if len(self._waiting) >= self.max_batch_size or left <= 0:
                    batch = self._waiting[: self.max_batch_size]
                else:
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=left)
                    except TimeoutError:
                        pass
                    continue
            if not batch:
                await self._wake.wait()
                continue
            sent = {id(p) for p in batch}
            self._waiting = [p for p in self._waiting if id(p) not in sent]
            for p in batch:
                self._in_flight[p.req.id] = p
            self._observe(batch, windowed)
            task = asyncio.create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _observe(self, batch: list[_Pending], windowed: bool) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        for p in batch:
            self.metrics.queue.observe(now - p.enqueued)
        if windowed:
            self.metrics.window_wait.observe(now - batch[0].enqueued)

    async def _run(self, batch: list[_Pending]) -> None:
        by_id = {p.req.id: p for p in batch}
        try:
            async for ev in self.client.generate(GenerateBatch(requests=[p.req for p in batch])):
                p = by_id.get(ev.id)
                if p is None:
                    continue
                p.started = True
                p.out.put_nowait(ev)
                ended = p.progress.see(ev)
                if ended:
                    self._in_flight.pop(ev.id, None)
                    by_id.pop(ev.id)
                if ended or isinstance(ev, DoneEvent):
                    self._wake.set()  # a slot freed: a waiting request may start now
        except APIError as e:
            self._fail(by_id.values(), e)
        except Exception as e:  # a malformed stream must not leave clients waiting forever
            log.exception("batch failed")
            self._fail(by_id.values(), BackendUnavailable(f"The model server stream failed: {type(e).__name__}"))
        else:
            if by_id:
                self._fail(by_id.values(), BackendUnavailable("The model server ended the stream early."))

    def _fail(self, pending, err: APIError) -> None:
        """End these requests with `err`, but for a model server that failed (BackendUnavailable), first
        let `reroute` send those that had not started elsewhere."""
        pending = [p for p in pending if self._in_flight.pop(p.req.id, None) is not None]
        if self.reroute is not None and isinstance(err, BackendUnavailable):
            fresh = [p for p in pending if not p.started]
            moved = {id(p) for p in fresh} - {id(p) for p in self.reroute(fresh, err)}
            pending = [p for p in pending if id(p) not in moved]
        for p in pending:
            p.out.put_nowait(err)
        self._wake.set()  # their slots are free

