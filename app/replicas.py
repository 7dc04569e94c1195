"""The model servers behind the API (BACKEND_URLS): their clients, batchers, what they serve, whether
they are up, and the router that sends each request to one of them (app/routing.py's policy).

Each replica has its own DynamicBatcher (so its batches fit its own free slots) and its own record of
the prompt prefixes it was sent. The router takes the batcher's place for a Generation: `submit`
routes every request of an API call, `cancel` finds where each went.

Health: every replica's /info is read every INFO_REFRESH_S (a new `created` means it restarted: new
capacity, empty cache). One that does not answer, or whose batch stream fails, is out of rotation
until it answers again. Requests of a failed batch that had not started there (no event yet) are
sent once more, to another replica; the others end with the failure (a 503 before the first byte,
an error event in a stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

from app.backend_client import BackendClient
from app.batcher import DynamicBatcher
from app.errors import APIError, BackendUnavailable, ModelNotFound
from app.metrics import ApiMetrics
from app.routing import Candidate, PrefixMemory, choose, prefix_keys, prompt_text
from common.protocol import GenerationRequest, ModelInfo

log = logging.getLogger("app.replicas")


class Replica:
    def __init__(self, url: str, client: BackendClient, batcher: DynamicBatcher):
        self.url = url
        self.client = client
        self.batcher = batcher
        self.info: ModelInfo | None = None
        self.up: bool | None = None  # None: never probed yet
        self.prefixes = PrefixMemory()
        self.embedding = 0  # embeddings requests running here

    @property
    def load(self) -> int:
        """Sequences queued here and running here, and embeddings requests."""
        return self.batcher.busy_slots + self.batcher.waiting_sequences + self.embedding

    def serves(self, model: str) -> bool:
        return self.info is not None and self.info.name == model

    def usable(self) -> bool:
        return self.up is not False


class Router:
    def __init__(self, replicas: list[Replica], imbalance: int, metrics: ApiMetrics | None = None,
                 policy: str = "affinity", make_replica: Callable[[str], Replica] | None = None,
                 discover: Callable[[], Awaitable[list[str]]] | None = None):
        """make_replica and discover: a replica set that changes (Ray Serve): `discover()` returns the
        model servers' URLs now; new ones are added, vanished ones dropped once idle."""
        if not replicas and discover is None:
            raise ValueError("no model servers configured")
        self.replicas: list[Replica] = []
        self.imbalance = imbalance
        self.metrics = metrics
        self.policy = policy
        self.make_replica = make_replica
        self.discover = discover
        self._turn = 0
        for r in replicas:
            self._add(r)

    def _add(self, replica: Replica) -> None:
        replica.batcher.reroute = lambda pending, err, r=replica: self._reroute(r, pending, err)
        self.replicas.append(replica)

    async def sync(self) -> None:
        """Follow `discover()`: start new replicas; drop one that is no longer listed once it does not
        answer either (a replica listed no more but still answering, e.g. while a restarted directory
        fills up again, keeps serving). Requests still on a dropped one end with an error, those that
        had not started there go to another replica."""
        urls = await self.discover()
        known = {r.url for r in self.replicas}
        for url in urls:
            if url not in known:
                replica = self.make_replica(url)
                replica.batcher.start()
                self._add(replica)
                log.info("model server %s joined", url)
        for r in [r for r in self.replicas if r.url not in urls and r.up is False]:
            self.replicas.remove(r)
            r.batcher.abort(BackendUnavailable(f"The model server {r.url} went away."))
            await r.batcher.stop()
            await r.client.aclose()
            log.info("model server %s left", r.url)

    # --- what is served -------------------------------------------------------------------------
    async def refresh(self, replica: Replica) -> None:
        """Read a replica's /info; a new `created` (a restart) replaces what was known of it."""
        try:
            info = await replica.client.info()
        except BackendUnavailable:
            self._set_up(replica, False)
            raise
        old = replica.info
        if old is None or old.created != info.created:
            if old is not None:
                log.info("%s restarted (loaded at %d, was %d): serving %s, %d slots", replica.url, info.created,
                         old.created, info.name, info.n_parallel)
                replica.prefixes.forget()
            replica.info = info
            replica.batcher.set_capacity(info.n_parallel)
        self._set_up(replica, True)

    async def watch(self, every_s: float) -> None:
        while True:
            if self.discover is not None:
                try:
                    await self.sync()
                except Exception:  # discovery failing must not stop health checks
                    log.exception("discovering model servers failed")
            await asyncio.gather(*(self._probe(r) for r in list(self.replicas)))
            await asyncio.sleep(every_s)

    async def _probe(self, replica: Replica) -> None:
        try:
            await self.refresh(replica)
        except BackendUnavailable:
            pass
        except Exception as e:  # an unreadable /info: out of rotation, and the health checks go on
            log.warning("model server %s: /info unreadable (%s)", replica.url, type(e).__name__)
            self._set_up(replica, False)

    def _set_up(self, replica: Replica, up: bool) -> None:
        if replica.up is not False and not up:
            log.warning("model server %s is down: out of rotation", replica.url)
        elif replica.up is False and up:
            log.info("model server %s is back", replica.url)
        replica.up = up
        if self.metrics is not None:
            self.metrics.backend_up.labels(replica.url).set(int(up))

    async def models(self) -> dict[str, ModelInfo]:
        """Model name -> its info, over the replicas that are up. While none is up (a start, or every one
        down) each is asked now, so that a model server that came back serves at once; otherwise the
        health checks (watch) look after the others, and a request never waits on one that hangs."""
        if not any(r.up for r in self.replicas):
            await asyncio.gather(*(self._probe(r) for r in self.replicas))
        out: dict[str, ModelInfo] = {}
        for r in self.replicas:
            if r.info is not None and r.up:
                out.setdefault(r.info.name, r.info)
        if not out:
            raise BackendUnavailable("No model server is reachable.")
        return out

    async def check(self, model: str) -> ModelInfo:
        models = await self.models()
        if model not in models:
            names = ", ".join(f"'{m}'" for m in models)
            raise ModelNotFound(f"The model '{model}' does not exist. This server serves {names}.", param="model")
        return models[model]

    # --- routing --------------------------------------------------------------------------------
    def pick(self, model: str, req: GenerationRequest | None = None, exclude: Replica | None = None) -> Replica:
        """The replica for a request of `model` (app/routing.py; without a request, e.g. embeddings,
        the least loaded), or BackendUnavailable."""
        keys = prefix_keys(prompt_text(req)) if req is not None else []
        pool = [r for r in self.replicas if r.usable() and r.serves(model) and r is not exclude]
        if not pool:
            raise BackendUnavailable(f"No model server serving '{model}' is reachable.")
        text = prompt_text(req) if req is not None else str(self._turn)
        tie = keys[0] if keys else hashlib.blake2b(text.encode("utf-8", "surrogatepass")).digest()
        policy = self.policy if req is not None else "least_loaded"
        name = choose([Candidate(r.url, r.load, r.prefixes.matched(keys)) for r in pool], self.imbalance, tie,
                      policy, self._turn)
        self._turn += 1
        chosen = next(r for r in pool if r.url == name)
        chosen.prefixes.add(keys)
        return chosen

    def submit(self, reqs: list[GenerationRequest], out: asyncio.Queue, model: str) -> None:
        """Route each request; their events (and errors) go to `out` (the DynamicBatcher interface)."""
        chosen = [(r, self.pick(model, r)) for r in reqs]
        for replica in {id(rep): rep for _, rep in chosen}.values():  # all or nothing: each queue's limit
            replica.batcher.check_room(sum(1 for _, rep in chosen if rep is replica))
        for r, replica in chosen:
            replica.batcher.submit([r], out)

    def cancel(self, ids: list[str]) -> None:
        for replica in self.replicas:  # each batcher stops those it holds (a rerouted one moved)
            replica.batcher.cancel(ids)

    def _reroute(self, failed: Replica, pending: list, err: APIError) -> list:
        """A batch on `failed` broke: it is out of rotation; requests that had not started there go,
        once, to another replica serving their model. Returns those that could not be moved."""
        self._set_up(failed, False)
        left = []
        for p in pending:
            if p.retried or failed.info is None:
                left.append(p)
                continue
            try:
                other = self.pick(failed.info.name, p.req, exclude=failed)
            except BackendUnavailable:
                left.append(p)
                continue
            p.retried = True
            log.info("request %s: %s failed before it started (%s); sent to %s", p.req.id, failed.url, err.message, other.url)
            other.batcher.resubmit(p)
        return left

    # --- figures --------------------------------------------------------------------------------
    @property
    def waiting_count(self) -> int:
        return sum(r.batcher.waiting_count for r in self.replicas)

    @property
    def in_flight_count(self) -> int:
        return sum(r.batcher.in_flight_count for r in self.replicas)

    def start(self) -> None:
        for r in self.replicas:
            r.batcher.start()

    async def stop(self) -> None:
        for r in self.replicas:
            await r.batcher.stop()
            await r.client.aclose()


def build_router(urls: list[str], make_batcher: Callable[[BackendClient], DynamicBatcher], imbalance: int,
                 metrics: ApiMetrics | None = None, client: BackendClient | None = None, policy: str = "affinity",
                 discover: Callable[[], Awaitable[list[str]]] | None = None) -> Router:
    """A router over these model-server URLs (`client`: a ready client for a single one, e.g. tests;
    `discover`: URLs found at run time instead, e.g. Ray Serve's replicas)."""

    def make_replica(url: str) -> Replica:
        c = BackendClient(url)
        return Replica(url, c, make_batcher(c))

    replicas = [Replica(urls[0], client, make_batcher(client))] if client is not None else [make_replica(u) for u in urls]
    return Router(replicas, imbalance, metrics, policy, make_replica, discover)
