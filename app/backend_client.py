"""HTTP client for the model server's internal protocol (common/protocol.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from app.errors import BackendUnavailable
from common.protocol import (
    CancelRequest,
    Event,
    GenerateBatch,
    Health,
    ModelInfo,
    event_adapter,
)


class BackendClient:
    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None):
        self.base_url = base_url
        # Generation streams can be long and quiet (prefill of a long prompt): no read timeout.
        self.http = client or httpx.AsyncClient(
            base_url=base_url, timeout=httpx.Timeout(10.0, read=None), limits=httpx.Limits(max_connections=1000)
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
                    raise BackendUnavailable(f"The model server answered {resp.status_code}: {body}")
                async for line in resp.aiter_lines():
                    if line:
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
