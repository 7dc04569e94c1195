"""Typed API errors and the one place that turns every error into its envelope.

Raise an APIError subclass anywhere; the handlers installed by `install_error_handlers` render OpenAI's
{"error": {"message", "type", "param", "code"}} with the error's status, or, on the routes of Anthropic's
Messages API, Anthropic's {"type": "error", "error": {"type", "message"}}. No regex over exception text.
"""

from __future__ import annotations

import json
import logging
import re

from anthropic.types import ErrorResponse as AnthropicErrorResponse
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("app.errors")


class APIError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(APIError):
    pass


class Unsupported(APIError):
    code = "unsupported_parameter"


class ContextLengthExceeded(APIError):
    code = "context_length_exceeded"


class ModelNotFound(APIError):
    status = 404
    code = "model_not_found"


class NotFound(APIError):
    status = 404
    code = "not_found"


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ShuttingDown(TooManyRequests):
    """New work while the server drains (SIGTERM): 503 with Retry-After."""

    status = 503
    type = "service_unavailable"
    code = "server_shutting_down"


class BackendUnavailable(APIError):
    status = 503
    type = "service_unavailable"
    code = "backend_unavailable"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


class _ErrorJSON(JSONResponse):
    def render(self, content) -> bytes:
        # ASCII with \u escapes: a message that quotes the client's input renders even when that input
        # holds a lone surrogate (which UTF-8 cannot encode).
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def is_anthropic_path(path: str) -> bool:
    """The routes of Anthropic's Messages API, whose clients read Anthropic's envelope."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error type for each status this API answers (https://docs.anthropic.com/en/api/errors). A
# full queue (429) and an unavailable or draining model server (503) are what Anthropic calls overloaded:
# 529 overloaded_error, which its SDKs and Claude Code retry after a pause.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "overloaded_error", 503: "overloaded_error"}
OVERLOADED = 529


def anthropic_error(err: APIError) -> tuple[int, dict]:
    """The status and body of `err` in Anthropic's envelope."""
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    # No `param` in this envelope: the field at fault leads the message, as in Anthropic's own ("max_tokens: ...").
    message = f"{err.param}: {err.message}" if err.param and err.param not in err.message else err.message
    body = AnthropicErrorResponse.model_validate({"type": "error", "error": {"type": kind, "message": message}})
    return (OVERLOADED if kind == "overloaded_error" else err.status), body.model_dump(mode="json", exclude_none=True)


def error_response(err: APIError, path: str = "") -> JSONResponse:
    status, body = anthropic_error(err) if is_anthropic_path(path) else (err.status, err.body())
    return _ErrorJSON(body, status_code=status, headers=err.headers())


def _is_union_tag(part) -> bool:
    """pydantic names the member of a union in an error's loc ('str', 'list[str]', "literal['a','b']",
    'NamedToolChoice'); our fields are snake_case words."""
    return isinstance(part, str) and (part in _TYPE_TAGS or part[:1].isupper() or any(c in part for c in "[]-'(),"))


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _path_of(loc: tuple) -> list:
    """The loc without the leading "body" and without union member tags."""
    parts = list(loc[1:] if loc[:1] == ("body",) else loc)
    return [p for p in parts if not _is_union_tag(p)]


def _param_of(loc: tuple) -> str | None:
    # ("body", "messages", 0, "content", "str") -> "messages[0].content"
    out = ""
    for p in _path_of(loc):
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _mismatch(err: dict) -> bool:
    return str(err.get("type", "")).endswith("_type")


def _most_specific(errors: list[dict]) -> dict:
    """The error to report: among those of the first error's field (pydantic's order), the one that got
    deepest into the value, an out-of-range value before a wrong type. A union reports one error per
    member; the deepest is the member the client meant (prompt [-1] is a token array with a negative id)."""
    field = _path_of(tuple(errors[0].get("loc", ())))[:1]
    same = [e for e in errors if _path_of(tuple(e.get("loc", ())))[:1] == field]
    return max(same, key=lambda e: (len(_path_of(tuple(e.get("loc", ())))), not _mismatch(e)))


def _union_forms(errors: list[dict], param_loc: list) -> list[str]:
    """The union members named by type-mismatch errors at exactly this loc (each member refused the value)."""
    forms = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if _path_of(loc) == param_loc and _mismatch(e) and loc and _is_union_tag(loc[-1]):
            forms.append(_readable(str(loc[-1])))
    return forms


def _readable(tag: str) -> str:
    """A union member's tag as a client reads it: 'list[function-before[_integral(), constrained-int]]' -> 'list[int]'."""
    if tag[:1].isupper():
        return "object"
    tag = tag.replace("constrained-", "")
    previous = None
    while previous != tag:
        previous, tag = tag, re.sub(r"function-[a-z]+\[[^\[\]]*?, ([^\[\]]+)\]", r"\1", tag)
    return tag


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"Request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    err = _most_specific(errors)
    loc = tuple(err.get("loc", ()))
    param = _param_of(loc)
    discriminator = (err.get("ctx") or {}).get("discriminator")
    if param is not None and isinstance(discriminator, str):  # a union told apart by a field: name the field
        param = f"{param}.{discriminator.strip(chr(39))}"
    if param is None:  # the body itself: absent, or JSON that is not an object
        if err.get("type") == "missing":
            return InvalidRequest("The request body is missing; send a JSON object.", code="invalid_json")
        return InvalidRequest(f"The request body must be a JSON object: {err.get('msg')}", code="invalid_json")
    if err.get("type") == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = err.get("msg")
    forms = _union_forms(errors, _path_of(loc)) if _mismatch(err) else []
    if len(forms) > 1:
        msg = f"Input should be one of: {', '.join(forms)}"
    return InvalidRequest(f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")


# OpenAI's error envelope as a JSON schema, for the OpenAPI document.
ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "description": "invalid_request_error, authentication_error, rate_limit_error, ..."},
            "param": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "the request field at fault"},
            "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    }},
}

# Anthropic's envelope, for the Messages API's routes.
ANTHROPIC_ERROR_SCHEMA = {
    "title": "AnthropicErrorResponse",
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {
            "type": {"type": "string", "description": "invalid_request_error, authentication_error, not_found_error, "
                                                      "overloaded_error, api_error"},
            "message": {"type": "string"},
        },
    }},
}

_ERROR_STATUSES = {
    "400": "Invalid request: a field out of range, of the wrong type, or not supported (names `param`)",
    "401": "Missing or wrong API key",
    "404": "Unknown model",
    "429": "Queue full or model server overloaded; retry after `Retry-After` seconds",
    "503": "Model server unavailable, or the server is shutting down",
    "529": "Overloaded (Anthropic's overloaded_error): queue full, model server unavailable, or the server is "
           "shutting down; retry after `Retry-After` seconds",
}


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API answers on errors: OpenAI's envelope with 400 (never
    FastAPI's 422, which this API does not send), 401, 404, 429 and 503 on the /v1/ routes; Anthropic's
    with 400, 401, 404 and 529 on the Messages API's."""
    original = app.openapi

    def openapi() -> dict:
        fresh = app.openapi_schema is None
        schema = original()
        if fresh:
            _document(schema)
        return schema

    app.openapi = openapi


def _document(schema: dict) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    components["AnthropicErrorResponse"] = ANTHROPIC_ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        anthropic = is_anthropic_path(path)
        ref = {"$ref": f"#/components/schemas/{'AnthropicErrorResponse' if anthropic else 'ErrorResponse'}"}
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if not path.startswith("/v1/"):
                continue
            statuses = ["401", "529" if anthropic else "503"]
            if op.get("requestBody") or op.get("parameters"):
                statuses += ["400", "404"]
            if method == "post" and not anthropic:
                statuses.append("429")
            for status in sorted(statuses):
                entry = {"description": _ERROR_STATUSES[status], "content": {"application/json": {"schema": ref}}}
                if status in ("429", "529"):
                    entry["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}}
                responses.setdefault(status, entry)
    used = json.dumps(schema.get("paths"))
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, referenced by nothing now
        if f'"#/components/schemas/{name}"' not in used:
            components.pop(name, None)


def install_error_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = NotFound(str(exc.detail)) if exc.status_code == 404 else InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        response = error_response(err, request.url.path)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(InternalError(f"Internal server error: {type(exc).__name__}"), request.url.path)
