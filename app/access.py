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

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries one of the keys. Every key is compared, in
        constant time each, so the time taken does not tell how much of a key was right."""
        if not self._keys:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        token = given.strip().encode() if scheme.lower() == "bearer" else b""
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(token, key)
        return ok


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Answer browsers' preflights and tag responses for the given origins ('*': any). Any request
    header is allowed: the OpenAI SDKs send their own (x-stainless-*). No cookies are involved
    (keys travel in Authorization), so credentials stay off and '*' is valid."""
    if not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"], expose_headers=["x-request-id", "retry-after"], max_age=600)
