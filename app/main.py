"""The API layer: OpenAI-compatible routes over the dynamic batcher and the model server."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from openai.types import Model
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from app.access import ApiKeys, add_cors
from app.backend_client import BackendClient
from app.batcher import DynamicBatcher
from app.config import AppSettings
from app.errors import APIError, BackendUnavailable, ModelNotFound, ShuttingDown, Unauthorized, error_response, install_error_handlers
from app.generation import ClientDisconnected, Generation, until_disconnect
from app.metrics import ApiMetrics
from app.request_log import CLIENT_CLOSED, RequestLogMiddleware
from app.schemas import ChatCompletionRequest, CompletionRequest, reject_unsupported
from app.serving_chat import ChatResponder, build_request
from app.serving_completions import CompletionsResponder, build_requests
from app.serving_embeddings import add_embeddings_route
from common.drain import Drain, DrainMiddleware
from common.protocol import ModelInfo

log = logging.getLogger("app")


class ModelRegistry:
    """What the model server serves, fetched on first use once it is ready, then kept.

    Every fetch hands the server's capacity (n_parallel) to the batcher; routes call `check` or
    `get` before they submit, so the batcher knows it before the first request is forwarded."""

    def __init__(self, client: BackendClient, batcher: DynamicBatcher):
        self.client = client
        self.batcher = batcher
        self.info: ModelInfo | None = None

    async def get(self) -> ModelInfo:
        if self.info is None:
            self.info = await self.client.info()
            self.batcher.set_capacity(self.info.n_parallel)
        return self.info

    async def check(self, model: str) -> ModelInfo:
        info = await self.get()
        if model != info.name:
            raise ModelNotFound(f"The model '{model}' does not exist. This server serves '{info.name}'.", param="model")
        return info

    async def refresh(self) -> None:
        """Fetch /info again; a model server that restarted (a new `created`) may serve another model,
        context size or slot count, so what was cached is replaced and the batcher told."""
        info = await self.client.info()
        old = self.info
        if old is not None and old.created == info.created:
            return
        if old is not None:
            log.info("model server restarted (loaded at %d, was %d): serving %s, %d slots",
                     info.created, old.created, info.name, info.n_parallel)
        self.info = info
        self.batcher.set_capacity(info.n_parallel)

    async def watch(self, every_s: float, up) -> None:
        """Check /info every `every_s` seconds while the app runs; `up(bool)` records reachability."""
        while True:
            try:
                await self.refresh()
                up(True)
            except BackendUnavailable:
                up(False)
            await asyncio.sleep(every_s)


def create_app(settings: AppSettings, client: BackendClient | None = None, drain: Drain | None = None) -> FastAPI:
    client = client or BackendClient(settings.resolved_backend_url())
    metrics = ApiMetrics()
    batcher = DynamicBatcher(client, settings.max_batch_size, settings.max_wait_ms, settings.max_queue, metrics=metrics)
    registry = ModelRegistry(client, batcher)
    drain = drain or Drain(settings.shutdown_grace_s)
    keys = ApiKeys(settings.api_keys())
    metrics.waiting.set_function(lambda: batcher.waiting_count)
    metrics.running.set_function(lambda: batcher.in_flight_count)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        watcher = asyncio.create_task(registry.watch(settings.info_refresh_s, metrics.backend_up.set))
        yield
        watcher.cancel()
        await batcher.stop()
        await client.aclose()

    app = FastAPI(title="llm-serve", description="OpenAI-compatible API over llama.cpp", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.drain = drain
    install_error_handlers(app)

    def refuse_while_draining(_scope) -> Response:
        metrics.rejected.labels("draining").inc()
        return error_response(ShuttingDown("The server is shutting down; retry shortly (or on another replica).", retry_after_s=5))

    # Outermost last: the request log sees every answer (CORS's and the drain's too).
    app.add_middleware(DrainMiddleware, drain=drain, guarded=lambda path: path.startswith("/v1/"), refuse=refuse_while_draining)
    add_cors(app, settings.cors_origin_list())
    app.add_middleware(RequestLogMiddleware, metrics=metrics)

    async def authorize(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise Unauthorized("Incorrect API key provided. Send 'Authorization: Bearer <key>'.")

    @app.get("/health")
    async def health():
        if drain.draining:
            return JSONResponse({"status": "draining", "in_flight": drain.in_flight}, status_code=503)
        h = await client.health()
        return JSONResponse({"status": h.status, "backend": h.model_dump()}, status_code=200 if h.status == "ok" else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)] if settings.metrics_require_key else [])
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        info = await registry.get()
        model = Model(id=info.name, object="model", created=info.created, owned_by="llm-serve")
        return {"object": "list", "data": [model.model_dump()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str):
        info = await registry.check(model_id)
        return Model(id=info.name, object="model", created=info.created, owned_by="llm-serve").model_dump()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        reject_unsupported(body)
        info = await registry.check(body.model)
        gen = Generation(batcher, build_requests(body), request.state.record)
        return await respond(request, gen, CompletionsResponder(body, info.name, gen), bool(body.stream))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        reject_unsupported(body)
        info = await registry.check(body.model)
        gen = Generation(batcher, [build_request(body)], request.state.record)
        return await respond(request, gen, ChatResponder(body, info.name, gen), bool(body.stream))

    add_embeddings_route(app, client, registry, dependencies=[Depends(authorize)])

    return app


async def respond(request: Request, gen: Generation, responder, stream: bool):
    request.state.record.stream = stream
    try:
        await until_disconnect(request, gen.start())
        if not stream:
            result = await until_disconnect(request, responder.full())
            return JSONResponse(result.model_dump(mode="json", exclude_unset=True))
    except ClientDisconnected:  # nobody to answer: stop the generation; the access log says so
        gen.cancel()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:  # an error: stop the generation
        gen.cancel()
        raise

    async def events():
        try:
            async for data in responder.stream():
                yield {"data": data}
        except APIError as e:  # the stream already started: report in-band, as OpenAI does
            yield {"data": json.dumps(e.body())}
        finally:
            if not gen.finished:
                request.state.record.left_early = True
            gen.cancel()  # no-op when finished; stops generation when the client left

    return EventSourceResponse(events(), ping=0, sep="\n")
