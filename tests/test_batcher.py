"""Dynamic batcher policy against a fake model server: full batch, window expiry, idle pass-through,
the queue limit (429), and cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.batcher import DynamicBatcher
from app.errors import BackendUnavailable, TooManyRequests
from common.protocol import DoneEvent, GenerationRequest, PromptEvent


class FakeBackend:
    """Records each batch; a batch's stream finishes when the test releases it."""

    def __init__(self):
        self.batches: list[tuple[float, list[str]]] = []
        self.release = asyncio.Event()
        self.cancelled: list[str] = []
        self.fail = False

    async def generate(self, batch):
        self.batches.append((time.monotonic(), [r.id for r in batch.requests]))
        if self.fail:
            raise BackendUnavailable("down")
        for r in batch.requests:
            yield PromptEvent(id=r.id, prompt_tokens=1)
        await self.release.wait()
        for r in batch.requests:
            yield DoneEvent(id=r.id, index=0, finish_reason="length", completion_tokens=1)

    async def cancel(self, ids):
        self.cancelled += ids


def reqs(*ids: str) -> list[GenerationRequest]:
    return [GenerationRequest(id=i, prompt="x") for i in ids]


@pytest.fixture
async def setup():
    backend = FakeBackend()
    made = []

    def make(**kw) -> DynamicBatcher:
        b = DynamicBatcher(backend, **kw)
        b.start()
        made.append(b)
        return b

    yield backend, make
    for b in made:
        await b.stop()


async def until(cond, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_idle_server_request_is_not_held_back(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=500)
    t0 = time.monotonic()
    b.submit(reqs("a"), asyncio.Queue())
    await until(lambda: backend.batches)
    assert backend.batches[0][1] == ["a"] and backend.batches[0][0] - t0 < 0.1


async def test_busy_server_full_batch_leaves_at_once(setup):
    backend, make = setup
    b = make(max_batch_size=3, max_wait_ms=5000)
    b.submit(reqs("first"), asyncio.Queue())  # makes the server busy
    await until(lambda: len(backend.batches) == 1)
    t0 = time.monotonic()
    for i in "abc":
        b.submit(reqs(i), asyncio.Queue())
    await until(lambda: len(backend.batches) == 2)
    assert backend.batches[1][1] == ["a", "b", "c"] and backend.batches[1][0] - t0 < 0.5


async def test_busy_server_window_expiry_sends_a_partial_batch(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=150)
    b.submit(reqs("first"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 1)
    t0 = time.monotonic()
    b.submit(reqs("a", "b"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 2)
    waited = backend.batches[1][0] - t0
    assert backend.batches[1][1] == ["a", "b"] and 0.12 <= waited < 1.0


async def test_batching_off_with_size_one(setup):
    backend, make = setup
    b = make(max_batch_size=1, max_wait_ms=0)
    b.submit(reqs("first"), asyncio.Queue())
    b.submit(reqs("a", "b"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 3)
    assert [ids for _, ids in backend.batches] == [["first"], ["a"], ["b"]]


async def test_queue_limit_gives_429_and_frees_up(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=0, max_queue=2)
    out = asyncio.Queue()
    b.submit(reqs("a", "b"), out)
    with pytest.raises(TooManyRequests) as e:
        b.submit(reqs("c"), asyncio.Queue())
    assert e.value.status == 429 and e.value.headers()["Retry-After"] == "1"
    backend.release.set()
    await until(lambda: b.admitted == 0)
    b.submit(reqs("c"), asyncio.Queue())  # room again


async def test_events_reach_their_own_queues(setup):
    backend, make = setup
    backend.release.set()
    b = make(max_batch_size=4, max_wait_ms=0)
    qa, qb = asyncio.Queue(), asyncio.Queue()
    b.submit(reqs("a"), qa)
    b.submit(reqs("b"), qb)
    got_a = [await asyncio.wait_for(qa.get(), 2) for _ in range(2)]
    got_b = [await asyncio.wait_for(qb.get(), 2) for _ in range(2)]
    assert {e.id for e in got_a} == {"a"} and {e.id for e in got_b} == {"b"}


async def test_cancel_waiting_and_in_flight(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=5000)
    b.submit(reqs("running"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 1)
    b.submit(reqs("waiting"), asyncio.Queue())
    b.cancel(["waiting", "running"])
    await until(lambda: backend.cancelled == ["running"])
    assert b.admitted == 0 and len(backend.batches) == 1


async def test_backend_failure_reaches_every_request(setup):
    backend, make = setup
    backend.fail = True
    b = make(max_batch_size=4, max_wait_ms=0)
    q = asyncio.Queue()
    b.submit(reqs("a"), q)
    assert isinstance(await asyncio.wait_for(q.get(), 2), BackendUnavailable)
