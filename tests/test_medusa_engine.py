"""Medusa in the engine on the real default model: output identical to plain decoding, alone and
concurrent, greedy and seeded sampling; figures reported; bad heads refused.

The heads are the base model's own output projection over a vocabulary subset (zero ResBlocks), so
they propose the right token wherever the text repeats: enough accepted drafts to exercise every
path of the verification without training.
"""

from __future__ import annotations

import numpy as np
import pytest

from backend.config import BackendSettings
from backend.local import run_requests
from backend.medusa.init_heads import base_initialised_heads
from backend.server import ModelService
from common.protocol import GenerationRequest

PROMPTS = [
    "1 1 1 1 1 1 1 1",
    "ha ha ha ha ha ha",
    "The capital of France is",
    "Once upon a time, in a small village",
    "def fibonacci(n):",
    "a, b, a, b, a, b, a, b,",
    "The main differences between TCP and UDP are",
    "Water boils at",
    "la la la la la la la",
    "Here is a list of fruits: apple, banana,",
]
LENGTHS = [40, 33, 16, 48, 64, 25, 12, 20, 57, 30]
_ids = iter(range(10**9))


def reqs(count: int = len(PROMPTS), **kw) -> list[GenerationRequest]:
    kw.setdefault("temperature", 0.0)
    return [
        GenerationRequest(id=f"m{next(_ids)}", prompt=p, max_tokens=n, **kw) for p, n in zip(PROMPTS[:count], LENGTHS)
    ]


def tokens(service, requests, together: bool) -> list[list[int]]:
    if together:
        out = run_requests(service, requests)
        return [out[r.id].choices[0].token_ids for r in requests]
    return [run_requests(service, [r])[r.id].choices[0].token_ids for r in requests]


@pytest.fixture(scope="module")
def plain_greedy(model_service):
    return tokens(model_service, reqs(), together=False)


@pytest.fixture(scope="module")
def medusa_service(model_service, plain_greedy, tmp_path_factory):
    used = {t for out in plain_greedy for t in out} | set(range(2048))
    heads = base_initialised_heads(model_service.model.path, 3, np.array(sorted(used)))
    path = tmp_path_factory.mktemp("heads") / "heads.safetensors"
    heads.save(path)
    # Speculate under any concurrency here, to check exactness when streams share steps.
    settings = BackendSettings(
        model=str(model_service.model.path), ctx_size=1024, n_parallel=4, threads=2,
        medusa_heads=str(path), medusa_tree="[[0], [0, 0], [0, 0, 0]]", medusa_max_streams=8,
    )
    service = ModelService(settings)
    service.load()
    assert service.error is None, service.error
    yield service
    service.engine.shutdown()


def test_greedy_alone_is_token_for_token_plain_greedy(medusa_service, plain_greedy):
    before = medusa_service.speculator.stats.steps
    assert tokens(medusa_service, reqs(), together=False) == plain_greedy
    st = medusa_service.speculator.stats
    assert st.steps > before
    assert st.tokens > st.steps  # drafts were accepted, so the accept path ran


def test_greedy_concurrent_is_token_for_token_plain_greedy(medusa_service, plain_greedy):
    assert tokens(medusa_service, reqs(), together=True) == plain_greedy


def test_seeded_sampling_is_lossless_and_reproducible(model_service, medusa_service):
    kw = dict(count=4, temperature=0.8, top_p=0.95, seed=4321, presence_penalty=0.3)
    plain = tokens(model_service, reqs(**kw), together=False)
    spec = tokens(medusa_service, reqs(**kw), together=False)
    assert spec == plain  # same target distribution, same random draws: the same tokens
    assert tokens(medusa_service, reqs(**kw), together=True) == plain


def test_typical_acceptance_is_opt_in_and_seed_reproducible(medusa_service):
    spec = medusa_service.speculator
    spec.typical = True
    try:
        kw = dict(count=3, temperature=0.7, seed=99)
        a = tokens(medusa_service, reqs(**kw), together=False)
        b = tokens(medusa_service, reqs(**kw), together=False)
    finally:
        spec.typical = False
    assert a == b and all(len(x) == n for x, n in zip(a, LENGTHS))


def test_typical_acceptance_never_bypasses_the_sampler_chain(model_service, tmp_path):
    # Heads whose vocabulary is the one token " ": they always propose it, and after "1" the model
    # itself finds " " likely, so typical acceptance would take it; a bias of -100 must still win.
    from backend.medusa.heads import Head, MedusaHeads

    banned = model_service.model.tokenize(" 1", add_special=False)[0]
    hidden = model_service.model.n_embd
    blocks = [(np.zeros((hidden, hidden), np.float32), np.zeros(hidden, np.float32))]
    MedusaHeads([Head(blocks, np.ones((1, hidden), np.float32)) for _ in range(2)],
                token_map=np.array([banned])).save(tmp_path / "h.safetensors")
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=256, n_parallel=1, threads=2,
                                           medusa_heads=str(tmp_path / "h.safetensors"), medusa_tree="[[0], [0, 0]]",
                                           medusa_acceptance="typical"))
    service.load()
    try:
        req = lambda bias: GenerationRequest(id=f"m{next(_ids)}", prompt=PROMPTS[0], max_tokens=24, temperature=0.7,
                                             seed=5, logit_bias=bias)
        free = run_requests(service, [r := req({})])[r.id].choices[0].token_ids
        assert free.count(banned) > 5  # the drafts are taken where no bias forbids them
        biased = run_requests(service, [r := req({banned: -100.0})])[r.id].choices[0].token_ids
        assert len(biased) == 24 and banned not in biased
    finally:
        service.engine.shutdown()


def test_figures_in_model_info_and_stats(medusa_service):
    from fastapi.testclient import TestClient

    from backend.server import create_app

    client = TestClient(create_app(medusa_service.settings, medusa_service))
    info = client.get("/info").json()
    assert info["medusa"] is True
    report = info["medusa_report"]
    assert report["heads"] == 3 and report["choices"] == [[0], [0, 0], [0, 0, 0]]
    assert report["mean_tokens_per_step"] > 1.0 and len(report["per_head_acceptance"]) == 3
    assert client.get("/stats").json()["medusa"]["speculative_steps"] == report["speculative_steps"]


def test_heads_for_another_model_are_refused(model_service, tmp_path):
    from tests.test_medusa_units import fd_state

    from backend.medusa.heads import heads_from_state_dict

    heads_from_state_dict(fd_state(n_heads=2, hidden=32, vocab=100)).save(tmp_path / "h.safetensors")
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=256, n_parallel=1,
                                           medusa_heads=str(tmp_path / "h.safetensors")))
    service.load()
    assert service.error and "hidden size 640" in service.error
    assert service.health().status == "error"


def test_a_tuning_that_found_no_gain_keeps_medusa_off(model_service, medusa_service, tmp_path):
    tree = tmp_path / "tree.json"
    tree.write_text('{"enabled": false, "choices": [], "reason": "measured slower"}')
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=256, n_parallel=1,
                                           medusa_heads=medusa_service.settings.medusa_heads, medusa_tree=str(tree)))
    service.load()
    try:
        assert service.error is None and service.speculator is None and service.info.medusa is False
    finally:
        service.engine.shutdown()


def test_without_a_tree_the_server_measures_costs_and_tunes_online(model_service, medusa_service, plain_greedy):
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4,
                                           threads=2, medusa_heads=medusa_service.settings.medusa_heads))
    service.load()
    try:
        spec = service.speculator
        assert service.error is None and spec.costs is not None and spec.note == "tuning online"
        assert set(spec.costs[0]) == {1, 2, 3, 4} and set(spec.costs[1]) == {1, 2, 3, 4}
        assert tokens(service, reqs(count=3), together=False) == plain_greedy[:3]
    finally:
        service.engine.shutdown()


def test_the_shipped_heads_are_found_and_keep_greedy_exact(model_service, plain_greedy):
    # MEDUSA_HEADS=auto finds heads/<GGUF stem>/heads.safetensors, trained by backend.medusa.train.
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4,
                                           threads=2, medusa_tree="[[0], [0, 0], [0, 0, 0]]", medusa_max_streams=8))
    service.load()
    try:
        assert service.error is None and service.info.medusa
        assert tokens(service, reqs(), together=False) == plain_greedy
        assert tokens(service, reqs(), together=True) == plain_greedy
        st = service.speculator.stats
        assert st.tokens / st.steps > 1.3  # trained heads: a good share of drafts accepted
    finally:
        service.engine.shutdown()
