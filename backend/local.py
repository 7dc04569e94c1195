"""Drive the engine in-process, without HTTP: for tests and the in-process benchmark baseline."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

from backend.runtime import ModelService
from common.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    PromptEvent,
    RequestProgress,
    TokenLogprob,
)


@dataclass
class ChoiceResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    stop_sequence: str | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter() at each delta with tokens


@dataclass
class RequestResult:
    prompt: PromptEvent | None = None
    error: ErrorEvent | None = None
    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    submitted: float = 0.0


def run_requests(service: ModelService, reqs: list[GenerationRequest], timeout_s: float = 300.0) -> dict[str, RequestResult]:
    """Submit all requests at once and collect every event until each is done or failed."""
    inbox: queue.Queue = queue.Queue()
    results = {r.id: RequestResult(submitted=time.perf_counter()) for r in reqs}
    left = {}
    for r in reqs:
        prep = service.prepare_one(r)
        if isinstance(prep, ErrorEvent):
            results[r.id].error = prep
        else:
            left[r.id] = RequestProgress(r.n)
            service.engine.submit(prep, inbox.put)
    deadline = time.monotonic() + timeout_s
    while left:
        events = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        now = time.perf_counter()
        for ev in events:
            res = results[ev.id]
            if ev.id in left and left[ev.id].see(ev):
                del left[ev.id]
            if isinstance(ev, PromptEvent):
                res.prompt = ev
            elif isinstance(ev, ErrorEvent):
                res.error = ev
            else:
                choice = res.choices.setdefault(ev.index, ChoiceResult())
                if isinstance(ev, DeltaEvent):
                    choice.text += ev.text
                    choice.deltas.append(ev.text)
                    choice.token_ids += ev.token_ids
                    choice.logprobs += ev.logprobs or []
                    if ev.token_ids:
                        choice.token_times.append(now)
                elif isinstance(ev, DoneEvent):
                    choice.finish_reason = ev.finish_reason
                    choice.completion_tokens = ev.completion_tokens
                    choice.stop_sequence = ev.stop_sequence
    return results
