"""Constrained decoding in the engine on the real default model: output follows the schema; greedy
is token for token the same with and without fast-forward and with and without Medusa, alone and
concurrent; seeded sampling under a grammar is reproducible and the same with drafts; rejected
drafts roll back; bad grammars are refused before any token."""

from __future__ import annotations

import json

import jsonschema
import pytest

from backend.config import BackendSettings
from backend.local import run_requests
from backend.runtime import ModelService
from common.protocol import ChatMessage, GenerationRequest, Grammar, ToolDefinition
from common.tool_reply import ReplyReader

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 30},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 16},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
PROMPTS = [
    "A customer record in JSON:\n",
    "Here is the profile of our newest employee as JSON:\n",
    "User data export (JSON):\n",
    "The following JSON describes a library member:\n",
]
_ids = iter(range(10**9))


def req(prompt: str, **kw) -> GenerationRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 160)
    return GenerationRequest(id=f"g{next(_ids)}", prompt=prompt, grammar=Grammar(type="json_schema", value=SCHEMA), **kw)


def outputs(service, requests, together: bool = False):
    if together:
        res = run_requests(service, requests)
        return [res[r.id] for r in requests]
    return [run_requests(service, [r])[r.id] for r in requests]


def token_ids(results) -> list[list[int]]:
    return [r.choices[i].token_ids for r in results for i in sorted(r.choices)]


def start(model_service, **kw) -> ModelService:
    settings = BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4, threads=2, **kw)
    service = ModelService(settings)
    service.load()
    assert service.error is None, service.error
    return service


@pytest.fixture(scope="module")
def masked_only(model_service):
    """The reference: the mask and nothing else (no fast-forward, no Medusa)."""
    service = start(model_service, medusa_heads="none", grammar_fast_forward=False)
    yield service
    service.close()


@pytest.fixture(scope="module")
def with_medusa(model_service):
    """Fast-forward and the shipped Medusa heads, speculating under any concurrency (prompt lookup off:
    Medusa's drafts are the ones under test)."""
    service = start(model_service, medusa_heads="auto", medusa_tree="[[0], [0, 0], [0, 0, 0]]", medusa_max_streams=8,
                    prompt_lookup="off")
    assert service.speculator is not None
    yield service
    service.close()


@pytest.fixture(scope="module")
def reference(masked_only):
    return outputs(masked_only, [req(p) for p in PROMPTS])


def test_constrained_greedy_follows_the_schema(reference):
    for r in reference:
        c = r.choices[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_fast_forward_gives_the_same_tokens_in_fewer_decodes(model_service, reference, masked_only):
    st = model_service.engine.stats
    drafted0, steps0 = st.forced_drafted, st.steps
    fast = outputs(model_service, [req(p) for p in PROMPTS])
    assert token_ids(fast) == token_ids(reference)
    assert st.forced_drafted - drafted0 > 0  # forced runs were verified as drafts
    generated = sum(len(t) for t in token_ids(fast))
    assert st.steps - steps0 < generated  # fewer decodes than tokens: forced runs took one decode each


def test_fast_forward_concurrent_is_the_same(model_service, reference):
    assert token_ids(outputs(model_service, [req(p) for p in PROMPTS], together=True)) == token_ids(reference)


def test_medusa_under_a_grammar_is_the_same_and_rejected_drafts_roll_back(with_medusa, reference):
    spec = with_medusa.speculator.stats
    steps0, proposed0, accepted0 = spec.steps, list(spec.proposed), list(spec.accepted)
    alone = outputs(with_medusa, [req(p) for p in PROMPTS])
    together = outputs(with_medusa, [req(p) for p in PROMPTS], together=True)
    assert token_ids(alone) == token_ids(reference)
    assert token_ids(together) == token_ids(reference)
    assert spec.steps > steps0  # Medusa drafts were verified under the grammar
    proposed = sum(spec.proposed) - sum(proposed0)
    accepted = sum(spec.accepted) - sum(accepted0)
    assert 0 < accepted < proposed  # some drafts taken, some rejected (the matcher kept only the accepted)


def test_seeded_sampling_under_a_grammar_is_reproducible_and_draft_independent(masked_only, model_service, with_medusa):
    requests = lambda: [req(p, temperature=0.9, seed=11 + i, n=2) for i, p in enumerate(PROMPTS[:2])]  # noqa: E731
    first = token_ids(outputs(masked_only, requests()))
    assert token_ids(outputs(masked_only, requests())) == first
    assert token_ids(outputs(model_service, requests())) == first
    assert token_ids(outputs(with_medusa, requests(), together=True)) == first
    for r in outputs(masked_only, requests()):
        for c in r.choices.values():
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), SCHEMA)


def test_a_schema_cut_short_by_max_tokens_ends_with_length(model_service):
    [r] = outputs(model_service, [req(PROMPTS[0], max_tokens=10)])
    assert r.choices[0].finish_reason == "length" and r.choices[0].text.startswith("{")


def test_bad_grammars_are_refused_before_any_token(model_service):
    bad = [Grammar(type="json_schema", value={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
           Grammar(type="lark", value="start: (", param="grammar"),
           Grammar(type="json_schema", value="not a schema")]
    for g in bad:
        r = GenerationRequest(id=f"g{next(_ids)}", prompt="x", grammar=g)
        res = run_requests(model_service, [r])[r.id]
        assert res.error is not None and res.error.code == "invalid_request" and res.error.param == g.param
        assert not any(c.token_ids for c in res.choices.values())


def test_compiled_grammars_are_cached(model_service):
    before = model_service.grammars.compiles
    outputs(model_service, [req(PROMPTS[0], max_tokens=4), req(PROMPTS[1], max_tokens=4)])
    assert model_service.grammars.compiles == before  # SCHEMA was compiled by an earlier test
    report = model_service.stats().grammar
    assert report.library.startswith("llguidance") and report.cache_hits >= 2


# A tool reply whose grammar makes the model write at least three calls: to `city` one of two names.
CALLS_SCHEMA = {"type": "object", "required": ["tool_calls"], "additionalProperties": False, "properties": {
    "tool_calls": {"type": "array", "minItems": 3, "maxItems": 8, "items": {
        "type": "object", "required": ["name", "arguments"], "additionalProperties": False, "properties": {
            "name": {"const": "get_weather"},
            "arguments": {"type": "object", "required": ["city"], "additionalProperties": False,
                          "properties": {"city": {"enum": ["Paris", "Oslo"]}}}}}}}}
WEATHER = ToolDefinition(name="get_weather", parameters=CALLS_SCHEMA["properties"]["tool_calls"]["items"]["properties"]["arguments"])


def tool_req(max_tokens: int, seed: int) -> GenerationRequest:
    return GenerationRequest(id=f"g{next(_ids)}", messages=[ChatMessage(role="user", content="Weather in Paris and Oslo?")],
                             tools=[WEATHER], grammar=Grammar(type="json_schema", value=CALLS_SCHEMA, param="tools"),
                             max_tokens=max_tokens, temperature=1.0, seed=seed)


def test_a_tool_reply_ends_at_its_first_repeated_call(model_service):
    # Two cities and at least three calls: the third call at the latest repeats one, and the reply ends
    # right there ("stop", not "length"), its last call a complete duplicate, never a fourth call.
    for seed in range(3):
        [r] = outputs(model_service, [tool_req(400, seed)])
        c = r.choices[0]
        reader = ReplyReader()
        reader.feed(c.text)
        assert c.finish_reason == "stop" and reader.duplicate and not reader.complete, c.text
        assert c.text.rstrip(", ").endswith("}}") and 1 <= len(reader.calls) <= 2, c.text  # no token of a fourth


def test_a_tool_reply_ends_after_a_call_when_another_would_not_fit(model_service):
    [first] = outputs(model_service, [tool_req(400, 7)])
    text = first.choices[0].text
    reader, cost = ReplyReader(), None
    for n, token in enumerate(first.choices[0].token_ids, 1):  # tokens up to the first call's end
        reader.feed(model_service.model.detokenize([token]))
        if reader.calls:
            cost = n
            break
    assert cost, text
    # Room for less than another call as long: the reply ends after the first one, as a complete reply.
    [short] = outputs(model_service, [tool_req(2 * cost - 1, 7)])
    assert short.choices[0].finish_reason == "stop" and short.choices[0].token_ids == first.choices[0].token_ids[:cost]
    # Room for one more: the reply goes on as it did.
    [roomy] = outputs(model_service, [tool_req(2 * cost + 2, 7)])
    assert roomy.choices[0].token_ids[:cost + 1] == first.choices[0].token_ids[:cost + 1]
