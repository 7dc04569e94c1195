"""API layer settings: each field is an env var (upper case) and a flag (--kebab-case)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings


class AppSettings(BaseSettings):
    host: str = Field("0.0.0.0", description="address the API listens on")
    port: int = Field(8000, description="port the API listens on")
    backend_url: str = Field("", description="model server base URL (default http://127.0.0.1:$BACKEND_PORT)")
    backend_urls: str = Field(
        "", description="comma-separated model server URLs (replicas, of one model or several); wins over BACKEND_URL"
    )
    router_policy: str = Field(
        "affinity", pattern="^(affinity|least_loaded|round_robin)$",
        description="how requests are spread over replicas: 'affinity' (prompt-cache affinity, then load), "
        "'least_loaded', 'round_robin' (baselines)"
    )
    router_imbalance: int = Field(
        4, ge=0, description="prompt-cache affinity gives way to the least loaded replica once the replica holding the "
        "prefix has this many more sequences queued and running"
    )
    backend_port: int = Field(8001, description="model server port, used when BACKEND_URL is empty")
    max_batch_size: int = Field(4, ge=1, description="most requests forwarded in one model-server call (1: no batching)")
    max_wait_ms: float = Field(
        100.0, ge=0, description="longest a request waits for its batch to fill while no slot is free for it (0: no waiting)"
    )
    max_queue: int = Field(256, ge=1, description="requests admitted at once; past it, 429 with Retry-After")
    api_key: str = Field("", description="comma-separated API keys; if any is set, clients must send 'Authorization: Bearer <key>'")
    api_key_file: str = Field("", description="a file of API keys, one per line (# comments), added to API_KEY's")
    metrics_require_key: bool = Field(False, description="/metrics also needs an API key (it is open by default, as /health is)")
    cors_origins: str = Field(
        "", description="comma-separated origins browsers may call the API from ('*': any); empty: no CORS headers"
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM/Ctrl-C, how long requests in flight may run on while new ones get 503 (0: stop at once)"
    )
    responses_store_max_entries: int = Field(
        1000, ge=0, description="stored responses (/v1/responses with store: true) kept for GET and previous_response_id; "
        "past it the least recently used go (0: none kept)"
    )
    responses_store_max_bytes: int = Field(
        256 * 2**20, ge=0, description="bytes of JSON the response store holds at most (each entry holds its whole "
        "conversation); past it the least recently used go"
    )
    info_refresh_s: float = Field(5.0, gt=0, description="how often the model server's /info is checked for a restart")
    log_level: str = Field("info", description="debug, info, warning or error")

    def api_keys(self) -> list[str]:
        """API_KEY's keys and API_KEY_FILE's; empty: the API is open."""
        keys = [k.strip() for k in self.api_key.split(",")]
        if self.api_key_file:
            lines = Path(self.api_key_file).read_text().splitlines()
            keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return [k for k in keys if k]

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def resolved_backend_url(self) -> str:
        return (self.backend_url or f"http://127.0.0.1:{self.backend_port}").rstrip("/")

    def backend_url_list(self) -> list[str]:
        """The model servers: BACKEND_URLS, else the one of BACKEND_URL (or BACKEND_PORT)."""
        urls = [u.strip().rstrip("/") for u in self.backend_urls.split(",") if u.strip()]
        return list(dict.fromkeys(urls)) or [self.resolved_backend_url()]
