"""schemathesis against the API's own OpenAPI schema (FastAPI's /openapi.json), on the live stack with the
real default model: every generated request, valid or not, gets no 5xx, and every error is OpenAI's
envelope {"error": {"message", "type", "param", "code"}}; requests the schema calls invalid are rejected.

The model field is set to the model the stack serves (so valid cases reach generation) and completion
lengths are capped (so the run stays near a minute on 2 cores).
"""

from __future__ import annotations

import json

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from app.errors import is_anthropic_path
from tests.test_api_mocked import named_sse_events

MAX_TOKENS = 3  # cap on max_tokens / max_completion_tokens of every generated request
EXAMPLES = 100  # per operation and mode in the fuzzing phase (the coverage phase adds its boundary cases)


def _openapi() -> dict:
    """What the API serves at /openapi.json (built from the same code; the test checks they are equal).
    Loaded at import: schemathesis' lazy fixture loader does not work with pytest 9's node ids."""
    from app.config import AppSettings
    from app.main import create_app

    return create_app(AppSettings(backend_url="http://unused")).openapi()


OPENAPI = _openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
schema.config.generation.update(max_examples=EXAMPLES, modes=["positive", "negative"])
schema.config.phases.update(phases=["coverage", "fuzzing"])
# schemathesis stops reading an event stream after 20 events by default (a stream may never end); ours end,
# and the check below wants every one read to its [DONE].
schema.config.max_stream_events = 100_000


def bounded(case, model: str) -> None:
    """Point a generated request at the served model and cap its completion length. Only a value the
    schema allows is replaced, so a case generated as invalid stays invalid."""
    if case.meta.generation.mode.is_positive and isinstance((case.path_parameters or {}).get("model_id"), str):
        case.path_parameters["model_id"] = model
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if "prompt" in body and body.get("max_tokens") is None:
        body["max_tokens"] = MAX_TOKENS  # completions default to 16; null runs to the context's end
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = MAX_TOKENS  # chat without a limit runs to the context's end
    if "input" in body and case.path == "/v1/responses" and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = MAX_TOKENS


def _is_envelope(obj) -> bool:
    err = obj.get("error") if isinstance(obj, dict) else None
    return (
        isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        and (err["param"] is None or isinstance(err["param"], str))
        and (err["code"] is None or isinstance(err["code"], str))
    )


# Streams of named events (`event: <type>`), by path: the event types one of which ends them.
NAMED_STREAMS = {"/v1/responses": {"response.completed", "response.incomplete", "response.failed"},
                 "/v1/messages": {"message_stop", "error"}}


def _is_anthropic_envelope(obj) -> bool:
    err = obj.get("error") if isinstance(obj, dict) else None
    return (obj.get("type") == "error" and isinstance(err, dict) and set(err) == {"type", "message"}
            and isinstance(err["type"], str) and isinstance(err["message"], str) and bool(err["message"]))


def openai_error_envelope(ctx, response, case):
    """Every error, as an HTTP status or in-band in a stream, is OpenAI's envelope; every stream ends in [DONE]
    (a stream of named events, in its final event). The Messages API's routes answer Anthropic's envelope."""
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if response.status_code >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"{response.status_code} with a body that is not JSON: {response.content[:300]!r}")
        envelope = _is_anthropic_envelope if is_anthropic_path(case.path) else _is_envelope
        assert envelope(body), f"{response.status_code} without its error envelope: {body}"
    elif content_type.startswith("text/event-stream") and case.path in NAMED_STREAMS:
        assert not getattr(response, "stream_cut_short", False), "the stream did not end"
        events = named_sse_events(response.content.decode("utf-8"))
        assert events and events[-1]["type"] in NAMED_STREAMS[case.path], f"a stream that does not end: {events[-1:]}"
        error = events[-1] if events[-1]["type"] == "error" else None
        assert error is None or _is_anthropic_envelope(error), f"an error event without the envelope: {error}"
    elif content_type.startswith("text/event-stream"):
        assert not getattr(response, "stream_cut_short", False), "the stream did not end"
        text = response.content.decode("utf-8")
        events = [b for b in text.split("\n\n") if b.strip()]
        assert events and all(e.startswith("data: ") for e in events), f"malformed SSE: {text[:300]!r}"
        assert events[-1] == "data: [DONE]", f"a stream that does not end in [DONE]: {text[-300:]!r}"
        for e in events[:-1]:
            chunk = json.loads(e[len("data: "):])
            assert "error" not in chunk or _is_envelope(chunk), f"an in-band error without the envelope: {chunk}"
    return None


def test_the_fuzzed_schema_is_the_one_the_api_serves(live_stack):
    import httpx

    assert httpx.get(f"{live_stack.base_url}/openapi.json").json() == OPENAPI


CHECKS = [not_a_server_error, negative_data_rejection, status_code_conformance, response_schema_conformance,
          openai_error_envelope]


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_openapi_schema_fuzz(case, live_stack):
    bounded(case, live_stack.model)
    response = case.call(base_url=live_stack.base_url, timeout=120)
    case.validate_response(response, checks=CHECKS)
    body = case.body
    streams = case.path.endswith(("completions", "/v1/messages"))
    if response.status_code == 200 and streams and body.get("stream") is not True:
        # Generated bodies seldom ask for a stream: each accepted one is sent again, streamed.
        body["stream"] = True
        case.validate_response(case.call(base_url=live_stack.base_url, timeout=120), checks=CHECKS)
