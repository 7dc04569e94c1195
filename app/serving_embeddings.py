"""POST /v1/embeddings: OpenAI's embeddings endpoint over the model server's /embed.

The model server tokenizes, checks the inputs against the model (vocabulary, context, size) and returns
unit-norm float32 vectors; this layer checks the model name, shapes OpenAI's response (float lists, or
base64 of little-endian float32 bytes as OpenAI sends them) and reports usage. Embeddings do not go
through the generation batcher: one /embed call carries all of a request's inputs, and the model
server batches them into its own decodes. They have their own admission limit: at most MAX_QUEUE
embeddings requests at once (the model server runs them one after another), past it a 429.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from openai.types import CreateEmbeddingResponse, Embedding
from openai.types.create_embedding_response import Usage
from pydantic import Field

from app.errors import InvalidRequest, TooManyRequests
from app.generation import ClientDisconnected, until_disconnect
from app.request_log import CLIENT_CLOSED
from app.schemas import Body, TokenId, integer
from common.protocol import EmbedRequest, EmbedResponse

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(Body):
    """Types strict, as the other bodies' (a token is an integer, never `true`)."""

    model: str = Field(description="the id /v1/models lists")
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a string, a list of strings, a token array or a list of token arrays (at most 2048 inputs)"
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="'float' lists, or 'base64' of little-endian float32 bytes"
    )
    dimensions: integer(ge=1, description="accepted only when it equals the model's embedding size") | None = None
    user: str | None = None


def inputs_of(req: EmbeddingRequest) -> list[str] | list[list[int]]:
    """A token array is one input; a list of strings or of token arrays is several."""
    x = req.input
    if isinstance(x, str):
        inputs = [x]
    elif not x:
        raise InvalidRequest("'input' must not be empty.", param="input")
    elif isinstance(x[0], int):
        return [list(x)]
    else:
        inputs = list(x)
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"'input' holds {len(inputs)} inputs; at most {MAX_INPUTS} per request.", param="input")
    for i, text in enumerate(inputs):
        # JSON's \u escapes can carry a lone UTF-16 surrogate, which UTF-8 (the model server's JSON) cannot
        if isinstance(text, str) and not text.isascii() and not _utf8(text):
            raise InvalidRequest(f"input[{i}] holds text that is not valid Unicode (a lone surrogate).", param="input")
    return inputs


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def build_response(req: EmbeddingRequest, model: str, result: EmbedResponse) -> CreateEmbeddingResponse:
    usage = Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    if req.encoding_format == "base64":
        # The SDK's own default: it decodes these bytes with numpy as float32. Embedding types the field
        # as a float list, so these objects are constructed without validation.
        data = [
            Embedding.model_construct(embedding=_base64_f32(v), index=i, object="embedding")
            for i, v in enumerate(result.vectors)
        ]
    else:
        # The model server sends each float32 value as the double it equals: passed on unchanged, a
        # client reading float32 gets the very bits the base64 form carries.
        data = [Embedding(embedding=v, index=i, object="embedding") for i, v in enumerate(result.vectors)]
    return CreateEmbeddingResponse(data=data, model=model, object="list", usage=usage)


def _base64_f32(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def add_embeddings_route(app: FastAPI, router, dependencies: list, max_queue: int, metrics=None) -> None:
    """Register POST /v1/embeddings; `router` (app/replicas.py) checks the model name and picks the
    model server; `dependencies` are the other routes' (API keys); at most `max_queue` at once."""
    admitted = [0]

    @app.post("/v1/embeddings", dependencies=dependencies)
    async def embeddings(body: EmbeddingRequest, request: Request):
        info = await router.check(body.model)
        if admitted[0] >= max_queue:
            if metrics is not None:
                metrics.rejected.labels("queue_full").inc()
            raise TooManyRequests(f"The server is at capacity ({max_queue} embeddings requests admitted); retry shortly.",
                                  retry_after_s=1)
        replica = router.pick(info.name)
        job = replica.client.embed(EmbedRequest(inputs=inputs_of(body), dimensions=body.dimensions))
        admitted[0] += 1
        replica.embedding += 1
        try:
            result = await until_disconnect(request, job)
        except ClientDisconnected:  # nobody to answer; the access log says so
            return Response(status_code=CLIENT_CLOSED)
        finally:
            admitted[0] -= 1
            replica.embedding -= 1
        record = getattr(request.state, "record", None)
        if record is not None:
            record.prompt_tokens += result.prompt_tokens
        resp = build_response(body, info.name, result)
        # warnings off: the base64 form is a string where the type says a float list
        return JSONResponse(resp.model_dump(mode="json", exclude_unset=True, warnings=False))
