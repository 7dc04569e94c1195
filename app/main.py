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
from app.errors import APIError, ShuttingDown, Unauthorized, error_response, install_error_handlers
from app.generation import ClientDisconnected, Generation, until_disconnect
from app.messages_schemas import CountTokensRequest, MessagesRequest
from app.metrics import ApiMetrics
from app.replicas import build_router
from app.request_log import CLIENT_CLOSED, RequestLogMiddleware
from app.responses_schemas import ResponsesRequest
from app.responses_store import ResponseStore
from app.schemas import ChatCompletionRequest, CompletionRequest, reject_unsupported
from app.serving_chat import ChatResponder, build_request
from app.serving_completions import CompletionsResponder, build_requests
from app.serving_embeddings import add_embeddings_route
from app.serving_messages import MessagesGeneration, MessagesResponder, TokenCounter, chat_request
from app.serving_responses import ResponsesResponder, Turn, TurnGeneration
from common.drain import Drain, DrainMiddleware

log = logging.getLogger("app")


def create_app(settings: AppSettings, client: BackendClient | None = None, drain: Drain | None = None,
               discover=None) -> FastAPI:
    """The API app over the model servers of `settings` (BACKEND_URLS / BACKEND_URL); `client`: a ready
    client for a single model server (tests); `discover`: an async function returning the model
    servers' URLs, followed every INFO_REFRESH_S (deployment/ray_serve.py)."""
    metrics = ApiMetrics()

    def make_batcher(c: BackendClient) -> DynamicBatcher:
        return DynamicBatcher(c, settings.max_batch_size, settings.max_wait_ms, settings.max_queue, metrics=metrics)

    urls = [client.base_url] if client is not None else [] if discover is not None else settings.backend_url_list()
    router = build_router(urls, make_batcher, settings.router_imbalance, metrics, client, settings.router_policy, discover)
    drain = drain or Drain(settings.shutdown_grace_s)
    keys = ApiKeys(settings.api_keys())
    metrics.waiting.set_function(lambda: router.waiting_count)
    metrics.running.set_function(lambda: router.in_flight_count)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        router.start()
        watcher = asyncio.create_task(router.watch(settings.info_refresh_s))
        yield
        watcher.cancel()
        await router.stop()

    app = FastAPI(title="llm-serve", description="OpenAI-compatible API over llama.cpp", lifespan=lifespan)
    app.state.router = router
    app.state.metrics = metrics
    app.state.drain = drain
    install_error_handlers(app)

    def refuse_while_draining(scope) -> Response:
        metrics.rejected.labels("draining").inc()
        return error_response(ShuttingDown("The server is shutting down; retry shortly (or on another replica).",
                                           retry_after_s=5), scope["path"])

    # Outermost last: the request log sees every answer (CORS's and the drain's too).
    app.add_middleware(DrainMiddleware, drain=drain, guarded=lambda path: path.startswith("/v1/"), refuse=refuse_while_draining)
    add_cors(app, settings.cors_origin_list())
    app.add_middleware(RequestLogMiddleware, metrics=metrics)

    async def authorize(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization"), request.headers.get("x-api-key")):
            raise Unauthorized("Incorrect API key provided. Send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")

    @app.get("/health")
    async def health():
        if drain.draining:
            return JSONResponse({"status": "draining", "in_flight": drain.in_flight}, status_code=503)
        if not router.replicas:
            return JSONResponse({"status": "loading", "detail": "no model server found yet", "replicas": []}, status_code=503)
        checks = await asyncio.gather(*(r.client.health() for r in router.replicas))
        replicas = [{"url": r.url, "model": r.info.name if r.info else None, **h.model_dump()}
                    for r, h in zip(router.replicas, checks)]
        ok = any(h.status == "ok" for h in checks)
        body = {"status": "ok" if ok else checks[0].status, "backend": checks[0].model_dump(), "replicas": replicas}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(authorize)] if settings.metrics_require_key else [])
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        models = await router.models()
        data = [Model(id=i.name, object="model", created=i.created, owned_by="llm-serve").model_dump() for i in models.values()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str):
        info = await router.check(model_id)
        return Model(id=info.name, object="model", created=info.created, owned_by="llm-serve").model_dump()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        reject_unsupported(body)
        info = await router.check(body.model)
        gen = Generation(router, build_requests(body), info.name, request.state.record)
        return await respond(request, gen, CompletionsResponder(body, info.name, gen), bool(body.stream))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        reject_unsupported(body)
        info = await router.check(body.model)
        gen = Generation(router, [build_request(body)], info.name, request.state.record)
        return await respond(request, gen, ChatResponder(body, info.name, gen), bool(body.stream))

    store = ResponseStore(settings.responses_store_max_entries, settings.responses_store_max_bytes)
    app.state.responses = store

    @app.post("/v1/responses", dependencies=[Depends(authorize)])
    async def create_response(body: ResponsesRequest, request: Request):
        turn = Turn(body, store)
        info = await router.check(body.model)
        gen = TurnGeneration(router, turn, info.name, request.state.record)
        return await respond(request, gen, ResponsesResponder(turn, info.name, gen, store), bool(body.stream))

    @app.get("/v1/responses/{response_id}", dependencies=[Depends(authorize)])
    async def get_response(response_id: str):
        return Response(store.response(response_id, "response_id"), media_type="application/json")

    @app.delete("/v1/responses/{response_id}", dependencies=[Depends(authorize)])
    async def delete_response(response_id: str):
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    # Anthropic's Messages API: the body becomes a chat request, run as chat runs it.
    @app.post("/v1/messages", dependencies=[Depends(authorize)])
    async def messages(body: MessagesRequest, request: Request):
        chat = chat_request(body)
        info = await router.check(body.model)
        gen = MessagesGeneration(router, body, chat, info.name, request.state.record)
        return await respond(request, gen, MessagesResponder(body, chat, info.name, gen), bool(body.stream))

    @app.post("/v1/messages/count_tokens", dependencies=[Depends(authorize)])
    async def count_message_tokens(body: CountTokensRequest, request: Request):
        chat = chat_request(body)
        info = await router.check(body.model)
        gen = MessagesGeneration(router, body, chat, info.name, request.state.record)
        return await respond(request, gen, TokenCounter(gen), False)

    add_embeddings_route(app, router, dependencies=[Depends(authorize)], max_queue=settings.max_queue, metrics=metrics)

    return app


async def respond(request: Request, gen: Generation, responder, stream: bool):
    request.state.record.stream = stream
    try:
        await until_disconnect(request, gen.start())
        if not stream:
            result = await until_disconnect(request, responder.full())
            # by alias: the wire names (Responses' text.format.schema is `schema_` in the openai types)
            return JSONResponse(result.model_dump(mode="json", by_alias=True, exclude_unset=True))
    except ClientDisconnected:  # nobody to answer: stop the generation; the access log says so
        gen.cancel()
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:  # an error: stop the generation
        gen.cancel()
        raise

    async def events():
        try:
            async for data in responder.stream():
                yield data if isinstance(data, dict) else {"data": data}  # a dict: an SSE event with its name
        except APIError as e:  # the stream already started: report in-band, as OpenAI does
            yield {"data": json.dumps(e.body())}
        finally:
            if not gen.finished:
                request.state.record.left_early = True
            gen.cancel()  # no-op when finished; stops generation when the client left

    return EventSourceResponse(events(), ping=0, sep="\n")
