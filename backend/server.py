"""The model server's HTTP front: the internal protocol of common/protocol.py over FastAPI.

The model loads in the background so /health can answer "loading" meanwhile. /generate streams
NDJSON: one line per event, lines of one engine step written together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from backend.chat_template import ChatTemplate, choose_template
from backend.config import BackendSettings
from backend.engine import Engine
from backend.llama_model import ContextConfig, LlamaModel
from backend.medusa.loading import build_speculator, heads_path, report
from backend.medusa.speculator import Speculator
from backend.model_files import default_cache_dir, resolve_model
from backend.preset import load_preset
from backend.prepare import PreparedRequest, prepare
from common.protocol import (
    CancelRequest,
    CancelResponse,
    DoneEvent,
    ErrorEvent,
    GenerateBatch,
    Health,
    MedusaReport,
    ModelInfo,
    Stats,
    TokenizeRequest,
    TokenizeResponse,
)

log = logging.getLogger("backend.server")


class ModelService:
    """Loads the model once and holds what the routes need."""

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self.model: LlamaModel | None = None
        self.engine: Engine | None = None
        self.template: ChatTemplate | None = None
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self.active_ids: set[str] = set()
        self.speculator: Speculator | None = None

    def medusa_report(self) -> MedusaReport | None:
        return report(self.speculator) if self.speculator is not None else None

    def load(self) -> None:
        try:
            s = self.settings = apply_preset(self.settings)
            path = resolve_model(s.model, Path(s.model_cache) if s.model_cache else None)
            log.info("loading %s", path)
            model = LlamaModel(
                path,
                ContextConfig(
                    s.ctx_size, s.n_parallel, s.threads, s.batch_size, s.extra_buffers,
                    embeddings=heads_path(s.medusa_heads, path) is not None,
                ),
            )
            self.speculator = build_speculator(s, model)
            if self.speculator is None and model.embeddings:
                model.set_embeddings(False)  # heads given but the tuning keeps Medusa off
                model.embeddings = False
            self.template = choose_template(
                s.chat_template, model.chat_template(), model.meta("general.architecture") or "", model.meta("general.name") or path.name
            )
            self.engine = Engine(model, prefill_chunk=s.prefill_chunk, speculator=self.speculator)
            self.engine.start()
            self.info = ModelInfo(
                name=s.model_name or path.name.removesuffix(".gguf"),
                path=str(path),
                n_ctx=model.n_ctx_per_seq,
                n_vocab=model.n_vocab,
                n_parallel=model.n_parallel,
                chat_template=self.template.text,
                chat_template_source=self.template.source,
                medusa=self.speculator is not None,
                created=int(time.time()),
            )
            self.model = model
            log.info("ready: %s (n_ctx %d per request, %d parallel)", self.info.name, model.n_ctx_per_seq, model.n_parallel)
        except Exception as e:  # reported by /health; the process stays up to say why
            log.exception("model failed to load")
            self.error = f"{type(e).__name__}: {e}"

    def health(self) -> Health:
        if self.error:
            return Health(status="error", detail=self.error)
        if self.model is None:
            return Health(status="loading")
        if not self.engine.is_alive():
            return Health(status="error", detail="engine thread stopped")
        return Health(status="ok")

    def prepare_one(self, req) -> PreparedRequest | ErrorEvent:
        return prepare(self.model, self.template, req)

    def prepare_all(self, batch: GenerateBatch) -> list[PreparedRequest | ErrorEvent]:
        out = []
        seen: set[str] = set()
        for req in batch.requests:
            if req.id in seen or req.id in self.active_ids:
                out.append(ErrorEvent(id=req.id, message=f"request id {req.id!r} is already in use", code="invalid_request"))
            else:
                out.append(self.prepare_one(req))
            seen.add(req.id)
        return out


def apply_preset(s: BackendSettings) -> BackendSettings:
    """PRESET=name fills the model, heads, tree and chat template a prepared preset recorded,
    where those settings were left at their defaults."""
    if not s.preset:
        return s
    p = load_preset(s.preset, Path(s.model_cache) if s.model_cache else default_cache_dir())
    if s.model not in ("", "default"):
        return s  # MODEL overrides the preset: its heads and template belong to the preset's model
    fill = {
        "model": p["model"],
        "medusa_heads": p["medusa_heads"] if s.medusa_heads == "auto" else s.medusa_heads,
        "medusa_tree": s.medusa_tree or p["medusa_tree"],
        "chat_template": s.chat_template or p["chat_template"],
        "model_name": s.model_name or p["name"],
    }
    return s.model_copy(update=fill)


def not_ready(service: ModelService) -> JSONResponse:
    return JSONResponse(service.health().model_dump(), status_code=503)


def create_app(settings: BackendSettings, service: ModelService | None = None) -> FastAPI:
    service = service or ModelService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if service.model is None and service.error is None:
            threading.Thread(target=service.load, name="model-load", daemon=True).start()
        yield
        if service.engine is not None:
            await asyncio.to_thread(service.engine.shutdown)

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
        return service.info.model_copy(update={"medusa_report": service.medusa_report()})

    @app.get("/stats", response_model=Stats)
    async def stats():
        if service.engine is None:
            return not_ready(service)
        st = service.engine.stats
        return Stats(active_requests=len(service.active_ids), steps=st.steps, prompt_tokens=st.prompt_tokens,
                     tokens_generated=st.tokens_generated, decode_seconds=round(st.decode_seconds, 3),
                     medusa=service.medusa_report())

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
        remaining: dict[str, int] = {}
        first_lines = []
        for item in prepared:
            if isinstance(item, ErrorEvent):
                first_lines.append(item.model_dump_json() + "\n")
            else:
                remaining[item.req.id] = item.req.n
                service.active_ids.add(item.req.id)
                service.engine.submit(item, sink)
        return StreamingResponse(_stream(service, inbox, remaining, first_lines), media_type="application/x-ndjson")

    return app


async def _stream(
    service: ModelService, inbox: asyncio.Queue, remaining: dict[str, int], first_lines: list[str]
) -> AsyncIterator[str]:
    try:
        if first_lines:
            yield "".join(first_lines)
        while remaining:
            events = await inbox.get()
            for ev in events:
                # A request ends with its last choice's done event, or with an error.
                if isinstance(ev, DoneEvent):
                    remaining[ev.id] -= 1
                if isinstance(ev, ErrorEvent) or remaining.get(ev.id) == 0:
                    remaining.pop(ev.id, None)
                    service.active_ids.discard(ev.id)
            yield "".join(ev.model_dump_json() + "\n" for ev in events)
    finally:
        # The client went away (or we are done): stop whatever of this batch still runs.
        if remaining:
            service.engine.cancel(list(remaining))
            service.active_ids.difference_update(remaining)
