"""Prompt-lookup drafts on the real default model: output identical to plain decoding (greedy and
seeded, alone and concurrent, with prompts that make the model copy), and the drafts really verified
and accepted there; the plan's figures in /stats."""

from __future__ import annotations

import pytest

from backend.config import BackendSettings
from backend.local import run_requests
from backend.runtime import ModelService
from common.protocol import GenerationRequest

PASSAGE = ("The lighthouse keeper climbed the ninety-two steps every evening at dusk, trimmed the wick, "
           "polished the great lens with a soft cloth, and wrote the weather in a leather logbook.")
PROMPTS = [
    f"{PASSAGE}\n\nRepeat the passage above word for word.\n\n{PASSAGE[:40]}",  # copies the passage
    "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return",  # code written again
    "red, green, blue, red, green, blue, red, green,",  # a repeating list
    "The capital of France is",  # nothing to copy: lookup has little to offer
]
LENGTHS = [48, 24, 30, 16]
_ids = iter(range(10**9))


def reqs(**kw) -> list[GenerationRequest]:
    kw.setdefault("temperature", 0.0)
    return [GenerationRequest(id=f"l{next(_ids)}", prompt=p, max_tokens=n, **kw) for p, n in zip(PROMPTS, LENGTHS)]


def tokens(service, requests, together: bool) -> list[list[int]]:
    if together:
        out = run_requests(service, requests)
        return [out[r.id].choices[0].token_ids for r in requests]
    return [run_requests(service, [r])[r.id].choices[0].token_ids for r in requests]


@pytest.fixture(scope="module")
def lookup_service(model_service):
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4, threads=2,
                                           medusa_heads="none", prompt_lookup="auto"))
    service.load()
    assert service.error is None, service.error
    yield service
    service.engine.shutdown()


def test_lookup_drafts_are_verified_and_output_is_plain_greedy(model_service, lookup_service):
    plain = tokens(model_service, reqs(), together=False)
    spec = lookup_service.speculator
    assert spec.lookup and not spec.on  # lookup only: no heads
    before = spec.verified["lookup"].steps, spec.verified["lookup"].tokens
    assert tokens(lookup_service, reqs(), together=False) == plain
    steps, made = spec.verified["lookup"].steps - before[0], spec.verified["lookup"].tokens - before[1]
    assert steps >= 5 and made / steps > 2.0  # copied text: several tokens per verify decode
    assert tokens(lookup_service, reqs(), together=True) == plain  # four streams: the plan decides per step


def test_seeded_sampling_with_lookup_is_plain_sampling(model_service, lookup_service):
    kw = dict(temperature=0.7, top_p=0.9, seed=99, logprobs=1)
    plain = run_requests(model_service, reqs(**kw))
    ours_reqs = reqs(**kw)
    before = lookup_service.speculator.verified["lookup"].steps
    ours = run_requests(lookup_service, ours_reqs)
    for (pid, p), r in zip(plain.items(), ours_reqs):
        got, want = ours[r.id].choices[0], p.choices[0]
        assert got.token_ids == want.token_ids
        assert [e.logprob for e in got.logprobs] == [e.logprob for e in want.logprobs]
    assert lookup_service.speculator.verified["lookup"].steps > before


def test_the_plan_reports_its_sources_costs_and_decisions(lookup_service):
    rep = lookup_service.stats().speculation
    assert set(rep["sources"]) == {"medusa", "lookup", "forced"}
    assert rep["sources"]["lookup"]["on"] is True and rep["sources"]["medusa"]["on"] is False
    assert rep["sources"]["lookup"]["judged_acceptance"][0] > 0
    assert set(rep["verify_cost_ms"]) >= {str(k) for k in range(1, 8)} and rep["decisions"]["verify"] > 0
    assert lookup_service.live_info().speculation["note"] == "planned per step"
