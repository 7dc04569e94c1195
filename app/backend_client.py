"""HTTP client for the model server's internal protocol (common/protocol.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from app.errors import APIError, BackendUnavailable, ContextLengthExceeded, InternalError, InvalidRequest, Unsupported
from common.protocol import (
    CancelRequest,
    EmbedError,
    EmbedRequest,
    EmbedResponse,
    Event,
    GenerateBatch,
    Health,
    ModelInfo,
    event_adapter,
)


async def ndjson_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-empty lines of an NDJSON byte stream, split at b"\\n" only.

    Not httpx's aiter_lines: it splits like str.splitlines, also at U+2028, U+2029 and U+0085, which
    JSON carries unescaped inside strings. A model that wrote a line separator (or a prompt echoed with
    one) cut its event in two, and the unparseable halves failed the whole batch with a 503. No byte of
    a multi-byte UTF-8 character is b"\\n", and JSON escapes a newline inside a string."""
    pending: list[bytes] = []
    async for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            complete[0] = b"".join(pending) + complete[0]
            pending = []
            for line in complete:
                if line.strip():
                    yield line
        if rest:
            pending.append(rest)
    tail = b"".join(pending)
    if tail.strip():
        yield tail


class BackendClient:
    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None):
        self.base_url = base_url
        # Only connecting has a time limit: a model server that does not take a connection in 10 s is down.
        # Generation streams can be long and quiet (prefill of a long prompt): no read timeout. A busy model
        # server (CPU contention) may read a large batch late: no write timeout. A request waiting for one of
        # the 1000 connections is an admitted one (MAX_QUEUE bounds them): it waits, no pool timeout.
        self.http = client or httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(None, connect=10.0), limits=httpx.Limits(max_connections=1000)
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def generate(self, batch: GenerateBatch) -> AsyncIterator[Event]:
        """Yield the batch's events as the model server streams them."""
        try:
            async with self.http.stream("POST", "/generate", content=batch.model_dump_json(),
                                        headers={"content-type": "application/json"}) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode("utf-8", "replace")[:500]
                    if resp.status_code < 500:  # it is up and refused the batch: another would refuse it too
                        raise InternalError(f"The model server refused the batch ({resp.status_code}): {body}")
                    raise BackendUnavailable(f"The model server answered {resp.status_code}: {body}")
                async for line in ndjson_lines(resp.aiter_bytes()):
                    yield event_adapter.validate_json(line)
        except httpx.HTTPError as e:
            raise BackendUnavailable(f"The model server is unreachable: {type(e).__name__}") from e

    async def cancel(self, ids: list[str]) -> None:
        try:
            await self.http.post("/cancel", content=CancelRequest(ids=ids).model_dump_json(),
                                 headers={"content-type": "application/json"})
        except httpx.HTTPError:
            pass  # nothing to cancel on a server that is gone

    async def info(self) -> ModelInfo:
        try:
            resp = await self.http.get("/info")
        except httpx.HTTPError as e:
            raise BackendUnavailable(f"The model server is unreachable: {type(e).__name__}") from e
        if resp.status_code != 200:
            raise BackendUnavailable(f"The model server is not ready: {resp.text[:300]}")
        return ModelInfo.model_validate_json(resp.content)

    async def health(self) -> Health:
        try:
            resp = await self.http.get("/health")
            return Health.model_validate_json(resp.content)
        except (httpx.HTTPError, ValueError) as e:
            return Health(status="error", detail=f"model server unreachable: {type(e).__name__}")

    async def embed(self, req: EmbedRequest) -> EmbedResponse:
        """POST /embed; the model server's refusals come back as the API's typed errors."""
        try:
            resp = await self.http.post("/embed", content=req.model_dump_json(), headers={"content-type": "application/json"})
        except httpx.HTTPError as e:
            raise BackendUnavailable(f"The model server is unreachable: {type(e).__name__}") from e
        if resp.status_code == 200:
            return EmbedResponse.model_validate_json(resp.content)
        if resp.status_code == 400:
            raise _embed_error(EmbedError.model_validate_json(resp.content))
        raise BackendUnavailable(f"The model server answered {resp.status_code}: {resp.text[:300]}")


def _embed_error(e: EmbedError) -> APIError:
    if e.code == "context_length_exceeded":
        return ContextLengthExceeded(e.message, param=e.param)
    if e.code == "unsupported":
        return Unsupported(e.message, param=e.param, code="embeddings_unavailable")
    return InvalidRequest(e.message, param=e.param, code="invalid_value")
