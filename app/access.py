"""Who may call the API: API keys (constant-time comparison) and the browser origins CORS admits."""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware


class ApiKeys:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None, api_key: str | None = None) -> bool:
        """Whether a request carries one of the keys, as 'Authorization: Bearer <key>' (OpenAI's SDKs,
        Anthropic's auth_token) or as 'x-api-key: <key>' (Anthropic's SDKs and Claude Code). Every key is
        compared, in constant time each, so the time taken does not tell how much of a key was right."""
        if not self._keys:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        tokens = [given.strip().encode() if scheme.lower() == "bearer" else b"", (api_key or "").strip().encode()]
        ok = False
        for key in self._keys:
            for token in tokens:
                ok |= hmac.compare_digest(token, key)
        return ok


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Answer browsers' preflights and tag responses for the given origins ('*': any). Any request
    header is allowed: the OpenAI SDKs send their own (x-stainless-*). No cookies are involved
    (keys travel in Authorization or x-api-key), so credentials stay off and '*' is valid."""
    if not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], expose_headers=["x-request-id", "retry-after"], max_age=600)
