"""The model server's HTTP front: the internal protocol of common/protocol.py over FastAPI.

The model loads in the background so /health can answer "loading" meanwhile. /generate streams
NDJSON: one line per event, lines of one engine step written together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.config import BackendSettings
from backend.embeddings import EmbedRefused
from backend.runtime import ModelService
from common.drain import Drain, DrainMiddleware
from common.protocol import EmbedRequest, EmbedResponse
from common.protocol import (
    CancelRequest,
    CancelResponse,
    DoneEvent,
    ErrorEvent,
    GenerateBatch,
    GenerationRequest,
    Health,
    ModelInfo,
    PromptEvent,
    RequestProgress,
    Stats,
    TokenizeRequest,
    TokenizeResponse,
)

log = logging.getLogger("backend.server")


def not_ready(service: ModelService) -> JSONResponse:
    return JSONResponse(service.health().model_dump(), status_code=503)


# Work a draining server refuses; /health, /info, /stats, /metrics and /cancel keep answering.
ADMITTING_PATHS = ("/generate", "/embed", "/tokenize")


def create_app(settings: BackendSettings, service: ModelService | None = None, drain: Drain | None = None) -> FastAPI:
    service = service or ModelService(settings)
    drain = drain or Drain(settings.shutdown_grace_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if service.model is None and service.error is None:
            threading.Thread(target=service.load, name="model-load", daemon=True).start()
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="llm-serve model server", lifespan=lifespan)
    app.state.service = service
    app.state.drain = drain

    def refuse_while_draining(_scope) -> Response:
        return JSONResponse(Health(status="draining", detail="shutting down").model_dump(), status_code=503,
                            headers={"Retry-After": "5"})

    app.add_middleware(DrainMiddleware, drain=drain, guarded=lambda path: path in ADMITTING_PATHS, refuse=refuse_while_draining)

    @app.get("/health", response_model=Health)
    async def health():
        h = Health(status="draining", detail=f"{drain.in_flight} in flight") if drain.draining else service.health()
        return JSONResponse(h.model_dump(), status_code=200 if h.status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(service.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", response_model=ModelInfo)
    async def info():
        if service.health().status != "ok":
            return not_ready(service)
        return service.live_info()

    @app.get("/stats", response_model=Stats)
    async def stats():
        if service.engine is None:
            return not_ready(service)
        return service.stats()

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        if service.health().status != "ok":
            return not_ready(service)
        return TokenizeResponse(tokens=service.model.tokenize(body.text, add_special=body.add_special))

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(body: EmbedRequest):
        if service.health().status != "ok":
            return not_ready(service)
        try:
            return await service.embed(body)
        except EmbedRefused as e:
            return JSONResponse(e.error.model_dump(), status_code=400)

    @app.post("/cancel", response_model=CancelResponse)
    async def cancel(body: CancelRequest):
        live = [i for i in body.ids if i in service.active_ids]
        if live and service.engine is not None:
            service.engine.cancel(live)
        return CancelResponse(cancelled=live)

    @app.post("/generate")
    async def generate(batch: GenerateBatch):
        if service.health().status != "ok":
            return not_ready(service)
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list] = asyncio.Queue()

        def sink(events: list) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(inbox.put_nowait, events)

        prepared = await asyncio.to_thread(service.prepare_all, batch)
        remaining: dict[str, RequestLog] = {}
        first_lines = []
        for req, item in zip(batch.requests, prepared):
            if isinstance(item, ErrorEvent):
                log.info("%s %s refused: %s (%s)", req.request_id or "-", req.id, item.code, item.message[:200])
                first_lines.append(item.model_dump_json() + "\n")
            else:
                remaining[item.req.id] = RequestLog(item.req)
                service.active_ids.add(item.req.id)
                service.engine.submit(item, sink)
        return StreamingResponse(_stream(service, inbox, remaining, first_lines), media_type="application/x-ndjson")

    return app


class RequestLog:
    """One request's progress and what its log line says when it ends."""

    def __init__(self, req: GenerationRequest):
        self.req = req
        self.progress = RequestProgress(req.n)
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.finish: list[str] = []
        self.error: str | None = None

    def see(self, ev) -> bool:
        if isinstance(ev, PromptEvent):
            self.prompt_tokens, self.cached_tokens = ev.prompt_tokens, ev.cached_tokens
        elif isinstance(ev, DoneEvent):
            self.completion_tokens += ev.completion_tokens
            self.finish.append(ev.finish_reason)
        elif isinstance(ev, ErrorEvent):
            self.error = ev.code
        return self.progress.see(ev)

    def line(self) -> str:
        # The API's request id first (x-request-id), so one grep finds the request in both layers' logs.
        end = f"error={self.error}" if self.error else "finish=" + ",".join(self.finish)
        return (f"{self.req.request_id or '-'} {self.req.id} prompt={self.prompt_tokens} cached={self.cached_tokens} "
                f"completion={self.completion_tokens} {end}")


async def _stream(
    service: ModelService, inbox: asyncio.Queue, remaining: dict[str, RequestLog], first_lines: list[str]
) -> AsyncIterator[str]:
    try:
        if first_lines:
            yield "".join(first_lines)
        while remaining:
            events = await inbox.get()
            for ev in events:
                entry = remaining.get(ev.id)
                if entry is not None and entry.see(ev):
                    del remaining[ev.id]
                    service.active_ids.discard(ev.id)
                    log.info("%s", entry.line())
            yield "".join(ev.model_dump_json() + "\n" for ev in events)
    finally:
        # The client went away (or we are done): stop whatever of this batch still runs.
        if remaining:
            service.engine.cancel(list(remaining))
            service.active_ids.difference_update(remaining)
            for entry in remaining.values():
                log.info("%s (cancelled: the API layer went away)", entry.line())
