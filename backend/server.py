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
from fastapi.responses import JSONResponse, StreamingResponse

from backend.config import BackendSettings
from backend.runtime import ModelService
from common.protocol import (
    CancelRequest,
    CancelResponse,
    ErrorEvent,
    GenerateBatch,
    Health,
    ModelInfo,
    RequestProgress,
    Stats,
    TokenizeRequest,
    TokenizeResponse,
)

log = logging.getLogger("backend.server")


def not_ready(service: ModelService) -> JSONResponse:
    return JSONResponse(service.health().model_dump(), status_code=503)


def create_app(settings: BackendSettings, service: ModelService | None = None) -> FastAPI:
    service = service or ModelService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if service.model is None and service.error is None:
            threading.Thread(target=service.load, name="model-load", daemon=True).start()
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="llm-serve model server", lifespan=lifespan)
    app.state.service = service

    @app.get("/health", response_model=Health)
    async def health():
        h = service.health()
        return JSONResponse(h.model_dump(), status_code=200 if h.status == "ok" else 503)

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
        remaining: dict[str, RequestProgress] = {}
        first_lines = []
        for item in prepared:
            if isinstance(item, ErrorEvent):
                first_lines.append(item.model_dump_json() + "\n")
            else:
                remaining[item.req.id] = RequestProgress(item.req.n)
                service.active_ids.add(item.req.id)
                service.engine.submit(item, sink)
        return StreamingResponse(_stream(service, inbox, remaining, first_lines), media_type="application/x-ndjson")

    return app


async def _stream(
    service: ModelService, inbox: asyncio.Queue, remaining: dict[str, RequestProgress], first_lines: list[str]
) -> AsyncIterator[str]:
    try:
        if first_lines:
            yield "".join(first_lines)
        while remaining:
            events = await inbox.get()
            for ev in events:
                progress = remaining.get(ev.id)
                if progress is not None and progress.see(ev):
                    del remaining[ev.id]
                    service.active_ids.discard(ev.id)
            yield "".join(ev.model_dump_json() + "\n" for ev in events)
    finally:
        # The client went away (or we are done): stop whatever of this batch still runs.
        if remaining:
            service.engine.cancel(list(remaining))
            service.active_ids.difference_update(remaining)
