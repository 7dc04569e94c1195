"""API layer settings: each field is an env var (upper case) and a flag (--kebab-case)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


class AppSettings(BaseSettings):
    host: str = Field("0.0.0.0", description="address the API listens on")
    port: int = Field(8000, description="port the API listens on")
    backend_url: str = Field("", description="model server base URL (default http://127.0.0.1:$BACKEND_PORT)")
    backend_port: int = Field(8001, description="model server port, used when BACKEND_URL is empty")
    max_batch_size: int = Field(4, ge=1, description="most requests forwarded in one model-server call (1: no batching)")
    max_wait_ms: float = Field(
        100.0, ge=0, description="longest a request waits for its batch to fill while no slot is free for it (0: no waiting)"
    )
    max_queue: int = Field(256, ge=1, description="requests admitted at once; past it, 429 with Retry-After")
    api_key: str = Field("", description="if set, clients must send 'Authorization: Bearer <key>'")
    log_level: str = Field("info", description="debug, info, warning or error")

    def resolved_backend_url(self) -> str:
        return (self.backend_url or f"http://127.0.0.1:{self.backend_port}").rstrip("/")
