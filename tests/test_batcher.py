"""Dynamic batcher policy against a fake model server: full batch, window expiry, idle pass-through,
free slots starting requests at once (capacity known), the queue limit (429), and cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.batcher import DynamicBatcher
from app.errors import BackendUnavailable, TooManyRequests
from common.protocol import DoneEvent, GenerationRequest, PromptEvent


class FakeBackend:
    """Records each batch; a choice's done event comes when the test releases every stream or
    finishes that choice (choices of a batch end in order)."""

    def __init__(self):
        self.batches: list[tuple[float, list[str]]] = []
        self.release = asyncio.Event()
        self.finished: set[tuple[str, int]] = set()
        self.cancelled: list[str] = []
        self.fail = False

    def finish(self, rid: str, index: int = 0) -> None:
        self.finished.add((rid, index))

    async def generate(self, batch):
        self.batches.append((time.monotonic(), [r.id for r in batch.requests]))
        if self.fail:
            raise BackendUnavailable("down")
        for r in batch.requests:
            yield PromptEvent(id=r.id, prompt_tokens=1)
        for r in batch.requests:
            for i in range(r.n):
                while not (self.release.is_set() or (r.id, i) in self.finished):
                    await asyncio.sleep(0.002)
                yield DoneEvent(id=r.id, index=i, finish_reason="length", completion_tokens=1)

    async def cancel(self, ids):
        self.cancelled += ids


def reqs(*ids: str, n: int = 1) -> list[GenerationRequest]:
    return [GenerationRequest(id=i, prompt="x", n=n) for i in ids]


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


# Capacity known (the model server's n_parallel): free slots start requests at once; the window only
# gathers requests while the slots they need are busy.


def sent(backend) -> list[list[str]]:
    return [ids for _, ids in backend.batches]


async def test_free_slots_start_requests_at_once_without_the_window(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=2000, capacity=4)
    b.submit(reqs("first"), asyncio.Queue())  # 1 of 4 slots busy
    await until(lambda: len(backend.batches) == 1)
    t0 = time.monotonic()
    for i in "abc":
        b.submit(reqs(i), asyncio.Queue())
    await until(lambda: len(backend.batches) == 2)
    assert sent(backend)[1] == ["a", "b", "c"] and backend.batches[1][0] - t0 < 0.3


async def test_every_slot_busy_window_gathers_as_before(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=300, capacity=2)
    b.submit(reqs("a", "b"), asyncio.Queue())  # idle: both leave at once and fill both slots
    await until(lambda: len(backend.batches) == 1)
    t0 = time.monotonic()
    b.submit(reqs("c"), asyncio.Queue())
    await asyncio.sleep(0.1)
    b.submit(reqs("d"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 2)
    assert sent(backend) == [["a", "b"], ["c", "d"]] and 0.27 <= backend.batches[1][0] - t0 < 1.0


async def test_every_slot_busy_full_batch_leaves_at_once(setup):
    backend, make = setup
    b = make(max_batch_size=2, max_wait_ms=5000, capacity=1)
    b.submit(reqs("first"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 1)
    t0 = time.monotonic()
    b.submit(reqs("a"), asyncio.Queue())
    await asyncio.sleep(0.2)
    assert len(backend.batches) == 1  # no slot: a waits for the window or a full batch
    b.submit(reqs("b"), asyncio.Queue())
    await until(lambda: len(backend.batches) == 2)
    assert sent(backend)[1] == ["a", "b"] and backend.batches[1][0] - t0 < 0.5


async def test_a_request_takes_a_slot_per_choice(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=600, capacity=3)
    b.submit(reqs("pair", n=2), asyncio.Queue())  # 2 of 3 slots busy
    await until(lambda: len(backend.batches) == 1)
    t0 = time.monotonic()
    b.submit(reqs("two", n=2), asyncio.Queue())
    b.submit(reqs("one"), asyncio.Queue())
    # "one" fits the free slot and leaves at once; "two" needs 2 slots and waits for the window.
    await until(lambda: len(backend.batches) == 2)
    assert sent(backend)[1] == ["one"] and backend.batches[1][0] - t0 < 0.3
    await until(lambda: len(backend.batches) == 3)
    assert sent(backend)[2] == ["two"] and 0.57 <= backend.batches[2][0] - t0 < 1.5


async def test_a_done_choice_frees_its_slot_for_a_waiting_request(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=3000, capacity=2)
    b.submit(reqs("pair", n=2), asyncio.Queue())  # both slots busy
    await until(lambda: len(backend.batches) == 1)
    b.submit(reqs("w"), asyncio.Queue())
    await asyncio.sleep(0.2)
    assert len(backend.batches) == 1
    t0 = time.monotonic()
    backend.finish("pair", 0)  # one choice done: one slot free, long before w's window ends
    await until(lambda: len(backend.batches) == 2, timeout=1.0)
    assert sent(backend)[1] == ["w"] and backend.batches[1][0] - t0 < 0.3


async def test_more_choices_than_capacity_go_to_an_idle_server_to_be_refused_there(setup):
    backend, make = setup
    b = make(max_batch_size=4, max_wait_ms=2000, capacity=2)
    t0 = time.monotonic()
    b.submit(reqs("huge", n=3), asyncio.Queue())  # never fits: the model server answers it with an error
    await until(lambda: backend.batches)
    assert sent(backend) == [["huge"]] and backend.batches[0][0] - t0 < 0.3
