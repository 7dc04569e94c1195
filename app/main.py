"""The API layer: OpenAI-compatible routes over the dynamic batcher and the model server."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from openai.types import Model
from sse_starlette.sse import EventSourceResponse

from app.backend_client import BackendClient
from app.batcher import DynamicBatcher
from app.config import AppSettings
from app.errors import APIError, ModelNotFound, install_error_handlers
from app.generation import Generation, until_disconnect
from app.schemas import ChatCompletionRequest, CompletionRequest, reject_unsupported
from app.serving_chat import ChatResponder, build_request
from app.serving_completions import CompletionsResponder, build_requests
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


def create_app(settings: AppSettings, client: BackendClient | None = None) -> FastAPI:
    client = client or BackendClient(settings.resolved_backend_url())
    batcher = DynamicBatcher(client, settings.max_batch_size, settings.max_wait_ms, settings.max_queue)
    registry = ModelRegistry(client, batcher)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        await client.aclose()

    app = FastAPI(title="llm-serve", description="OpenAI-compatible API over llama.cpp", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.registry = registry
    install_error_handlers(app)

    async def authorize(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            err = APIError("Incorrect API key provided.", code="invalid_api_key")
            err.status, err.type = 401, "authentication_error"
            raise err

    @app.get("/health")
    async def health():
        h = await client.health()
        return JSONResponse({"status": h.status, "backend": h.model_dump()}, status_code=200 if h.status == "ok" else 503)

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
        gen = Generation(batcher, build_requests(body))
        return await respond(request, gen, CompletionsResponder(body, info.name, gen), bool(body.stream))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        reject_unsupported(body)
        info = await registry.check(body.model)
        gen = Generation(batcher, [build_request(body)])
        return await respond(request, gen, ChatResponder(body, info.name, gen), bool(body.stream))

    return app


async def respond(request: Request, gen: Generation, responder, stream: bool):
    try:
        await until_disconnect(request, gen.start())
        if not stream:
            result = await until_disconnect(request, responder.full())
            return JSONResponse(result.model_dump(mode="json", exclude_unset=True))
    except BaseException:  # an error, or the client went away: stop the generation
        gen.cancel()
        raise

    async def events():
        try:
            async for data in responder.stream():
                yield {"data": data}
        except APIError as e:  # the stream already started: report in-band, as OpenAI does
            yield {"data": json.dumps(e.body())}
        finally:
            gen.cancel()  # no-op when finished; stops generation when the client left

    return EventSourceResponse(events(), ping=0, sep="\n")
