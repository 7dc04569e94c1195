"""The model-server requests behind one API call: submit them, wait until each has started (so
errors such as an over-long prompt become a proper HTTP status before any byte is streamed),
then hand out their events, and cancel whatever is left if the client goes away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from openai.types import CompletionUsage
from openai.types.completion_usage import PromptTokensDetails

from app.errors import (
    APIError,
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    TooManyRequests,
)
from app.replicas import Router
from app.request_log import RequestRecord
from app.schemas import SamplingFields
from common.protocol import DeltaEvent, ErrorEvent, GenerationRequest, PromptEvent, RequestProgress

_ERRORS = {
    "context_length_exceeded": ContextLengthExceeded,
    "invalid_request": InvalidRequest,
    "overloaded": TooManyRequests,
}


def error_from_event(ev: ErrorEvent) -> APIError:
    cls = _ERRORS.get(ev.code)
    if cls is TooManyRequests:
        return TooManyRequests(ev.message)
    if cls is None:
        return InternalError(ev.message)
    return cls(ev.message, param=ev.param)


def sampling_kwargs(req: SamplingFields) -> dict:
    """The fields every generation request shares, with OpenAI's defaults for nulls."""
    return dict(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        n=req.n or 1,
        stop=req.stop_list(),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        ignore_eos=bool(req.ignore_eos),
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


class Generation:
    def __init__(self, router: Router, reqs: list[GenerationRequest], model: str, record: RequestRecord | None = None):
        self.router = router
        self.model = model
        self.reqs = reqs
        self.record = record
        if record is not None:
            for r in reqs:
                r.request_id = record.request_id  # the model server's log lines name the client's request
        self.prompts: dict[str, PromptEvent] = {}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._early: list = []  # events that arrived while waiting for every prompt event
        self._progress = {r.id: RequestProgress(r.n) for r in reqs}

    async def start(self) -> None:
        self.router.submit(self.reqs, self._queue, self.model)
        try:
            while len(self.prompts) < len(self.reqs):
                ev = await self._next()
                if isinstance(ev, PromptEvent):
                    self.prompts[ev.id] = ev
                    if self.record is not None:
                        self.record.on_prompt(ev)
                else:
                    self._early.append(ev)
        except BaseException:
            self.cancel()
            raise

    async def events(self) -> AsyncIterator:
        """Delta and done events of every request until all choices are done."""
        while self._early or self._live():
            ev = self._early.pop(0) if self._early else await self._next()
            self._progress[ev.id].see(ev)
            if self.record is not None:
                if isinstance(ev, DeltaEvent):
                    self.record.on_tokens((ev.id, ev.index), len(ev.token_ids))
                if not self._live():
                    self.record.on_finished()
            yield ev

    def usage(self, completion_tokens: int) -> CompletionUsage:
        prompt_tokens = sum(p.prompt_tokens for p in self.prompts.values())
        cached_tokens = sum(p.cached_tokens for p in self.prompts.values())
        # Always sent, 0 included, as vLLM does with prefix caching on.
        return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               total_tokens=prompt_tokens + completion_tokens,
                               prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))

    @property
    def finished(self) -> bool:
        """Every choice of every request is done (or failed)."""
        return not self._live()

    def cancel(self) -> None:
        """Stop whatever is still running (no-op once every choice is done)."""
        live = self._live()
        for i in live:
            self._progress[i].choices_left = 0
        if live:
            self.router.cancel(live)

    async def _next(self):
        item = await self._queue.get()
        if isinstance(item, APIError):
            raise item
        if isinstance(item, ErrorEvent):
            self._progress[item.id].see(item)  # ended: nothing of it to cancel
            if item.code == "overloaded" and self.record is not None and self.record.metrics is not None:
                self.record.metrics.rejected.labels("overloaded").inc()
            raise error_from_event(item)
        return item

    def _live(self) -> list[str]:
        return [i for i, p in self._progress.items() if p.choices_left > 0]


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


def named_sse(event) -> dict:
    """One typed stream event as a named SSE message (Responses and Messages streams name their events;
    chat completions' do not). Only the fields the event was built with are sent, under their wire names."""
    return {"event": event.type, "data": event.model_dump_json(by_alias=True, exclude_unset=True)}


async def until_disconnect(request: Request, work: asyncio.Future):
    """Await `work`, cancelling it if the HTTP client disconnects first (non-streaming requests)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        task.cancel()  # no-op when it finished; stops it when the client left or we are cancelled
