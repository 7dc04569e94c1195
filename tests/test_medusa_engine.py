"""Medusa in the engine on the real default model: output identical to plain decoding, alone and
concurrent, greedy and seeded sampling, with n > 1, logprobs, stop strings and EOS inside a draft,
with prompts of several prefill chunks; every such test also shows that speculation ran; figures
reported; MEDUSA_MAX_STREAMS gating; bad heads and branching trees refused.

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
from backend.runtime import ModelService
from common.protocol import GenerationRequest
from tests.test_engine import LONG_PROMPTS, assert_long_prefill_overlapped_and_exact

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
    LONG_PROMPTS[1],  # three prefill chunks, prefilled while others decode and speculate
]
LENGTHS = [40, 33, 16, 48, 64, 25, 12, 20, 57, 30, 40]
_ids = iter(range(10**9))


def reqs(count: int = len(PROMPTS), which: list[int] | None = None, **kw) -> list[GenerationRequest]:
    kw.setdefault("temperature", 0.0)
    chosen = which if which is not None else list(range(count))
    return [GenerationRequest(id=f"m{next(_ids)}", prompt=PROMPTS[i], max_tokens=LENGTHS[i], **kw) for i in chosen]


def run_one(service, **kw):
    r = GenerationRequest(id=f"m{next(_ids)}", **kw)
    return run_requests(service, [r])[r.id]


def tokens(service, requests, together: bool) -> list[list[int]]:
    if together:
        out = run_requests(service, requests)
        return [out[r.id].choices[0].token_ids for r in requests]
    return [run_requests(service, [r])[r.id].choices[0].token_ids for r in requests]


class Speculated:
    """Medusa's counters over a block: `with Speculated(service) as ran: ...; assert ran.tokens_per_step > 1`."""

    def __init__(self, service):
        self.stats = service.speculator.stats

    def __enter__(self):
        self.steps0, self.tokens0 = self.stats.steps, self.stats.tokens
        self.accepted0 = list(self.stats.accepted)
        return self

    def __exit__(self, *exc):
        self.steps = self.stats.steps - self.steps0
        self.tokens_per_step = (self.stats.tokens - self.tokens0) / self.steps if self.steps else 0.0
        before = self.accepted0 + [0] * (len(self.stats.accepted) - len(self.accepted0))  # depths appear as judged
        self.accepted = [a - b for a, b in zip(self.stats.accepted, before)]


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
        medusa_heads=str(path), medusa_tree="[[0], [0, 0], [0, 0, 0]]", medusa_max_streams=8, prompt_lookup="off",
    )
    service = ModelService(settings)
    service.load()
    assert service.error is None, service.error
    yield service
    service.engine.shutdown()


def test_greedy_alone_is_token_for_token_plain_greedy(medusa_service, plain_greedy):
    with Speculated(medusa_service) as ran:
        assert tokens(medusa_service, reqs(), together=False) == plain_greedy
    assert ran.steps > 50 and ran.tokens_per_step > 1.2  # drafts were accepted, so the accept path ran


def test_greedy_concurrent_is_token_for_token_plain_greedy(medusa_service, plain_greedy):
    with Speculated(medusa_service) as ran:
        assert tokens(medusa_service, reqs(), together=True) == plain_greedy
    assert ran.steps > 50 and ran.tokens_per_step > 1.2


def test_seeded_sampling_is_lossless_and_reproducible(model_service, medusa_service):
    # Repetitive prompts, where sampled tokens often match the drafts, and two that are not.
    kw = dict(which=[1, 8, 3, 10], temperature=0.5, top_p=0.95, seed=4321, presence_penalty=0.1)
    plain = tokens(model_service, reqs(**kw), together=False)
    with Speculated(medusa_service) as alone:
        spec = tokens(medusa_service, reqs(**kw), together=False)
    assert spec == plain  # same target distribution, same random draws: the same tokens
    with Speculated(medusa_service) as together:
        assert tokens(medusa_service, reqs(**kw), together=True) == plain
    assert alone.steps > 20 and alone.tokens_per_step > 1.1
    assert together.steps > 20 and together.tokens_per_step > 1.1


def test_long_prompts_prefilled_while_others_speculate_match_plain(model_service, medusa_service):
    """Prompts of three prefill chunks, cold (a fresh first line: nothing cached), join while short
    requests decode and speculate: every request's tokens and logprobs are plain decoding's alone."""
    fresh = f"Log m{next(_ids)}.\n"
    mixed = [(PROMPTS[0], 40), (fresh + LONG_PROMPTS[1], 24), (PROMPTS[8], 57), (fresh + LONG_PROMPTS[0], 24)]
    assert all(len(model_service.model.tokenize(p, True)) > 600 for p, _ in mixed[1::2])

    def requests():
        return [GenerationRequest(id=f"m{next(_ids)}", prompt=p, max_tokens=n, temperature=0.0, logprobs=0)
                for p, n in mixed]

    plain = [run_requests(model_service, [r])[r.id].choices[0] for r in requests()]
    together_reqs = requests()
    with Speculated(medusa_service) as ran:
        together = run_requests(medusa_service, together_reqs)
    assert_long_prefill_overlapped_and_exact(together_reqs, together, plain)
    assert ran.steps > 10 and ran.tokens_per_step > 1.1


def test_n_choices_and_logprobs_are_those_of_plain_decoding(model_service, medusa_service):
    def run(service, prompt, max_tokens, **kw):
        r = GenerationRequest(id=f"m{next(_ids)}", prompt=prompt, max_tokens=max_tokens, logprobs=2, **kw)
        out = run_requests(service, [r])[r.id]
        return [(c.token_ids, [(e.logprob, [(t.token_id, t.logprob) for t in e.top]) for e in c.logprobs])
                for c in (out.choices[i] for i in range(r.n))]

    # A long prompt decodes past position 255, where verify decodes and lone plain decodes would
    # round differently without companion rows (backend/decode_plan.py); its repetitive end lets
    # drafts be accepted there.
    long_prompt = LONG_PROMPTS[0] + " Then they sang: la la la la la la la"
    cases = [(PROMPTS[1], 30, dict(n=2, temperature=0.0)), (PROMPTS[1], 30, dict(n=3, temperature=0.5, seed=12)),
             (long_prompt, 40, dict(temperature=0.0))]
    for prompt, max_tokens, kw in cases:
        with Speculated(medusa_service) as ran:
            spec = run(medusa_service, prompt, max_tokens, **kw)
        assert spec == run(model_service, prompt, max_tokens, **kw), kw  # tokens, and the very logprob numbers
        assert ran.steps >= 5 and ran.tokens_per_step > 1.2, kw
        if kw.get("seed"):
            assert spec[0] != spec[1]  # seeded choices differ from each other


def test_stop_strings_and_eos_inside_a_draft(model_service, medusa_service, tmp_path):
    # Stop strings: "ha ha ha ..." stops where twelve of them first stand together, inside a step
    # that accepted drafts; nothing of the stop string is emitted.
    stop_kw = dict(prompt=PROMPTS[1], max_tokens=33, temperature=0.0, stop=["ha ha ha ha ha ha ha ha ha ha ha ha"])
    with Speculated(medusa_service) as ran:
        stopped = run_one(medusa_service, **stop_kw).choices[0]
    plain = run_one(model_service, **stop_kw).choices[0]
    assert stopped.finish_reason == plain.finish_reason == "stop" and stopped.text == plain.text
    assert "ha" not in stopped.text and len(stopped.token_ids) == 12 and ran.steps >= 3 and ran.tokens_per_step > 1.2

    # EOS: heads 1 and 2 always propose EOS (a ResBlock bias of 1e4 on one unit, read by the EOS
    # row alone), head 0 is the base's own projection; a positive bias on EOS makes the model end
    # "ha ha ha ha ha" after some " ha" tokens. Where its end falls on depth 1 of a verify step, the
    # draft [" ha", EOS, EOS] holds it there: which bias does that depends on the machine's numbers
    # (llama.cpp's continuation differs between CPUs), so the biases are tried until one does.
    from backend.spec.heads import Head, MedusaHeads
    from backend.medusa.init_heads import base_initialised_heads

    m = model_service.model
    base = base_initialised_heads(m.path, 1, np.array(sorted(set(range(2048)) | {m.eos})))
    index_of_eos = int(np.searchsorted(base.token_map, m.eos))
    bias = np.zeros(m.n_embd, np.float32)
    bias[0] = 1e4
    eos_proj = np.zeros_like(base.heads[0].proj)
    eos_proj[index_of_eos, 0] = 1.0
    eos_head = Head([(np.zeros((m.n_embd, m.n_embd), np.float32), bias)], eos_proj)
    MedusaHeads([base.heads[0], eos_head, eos_head], token_map=base.token_map).save(tmp_path / "eos.safetensors")
    service = ModelService(BackendSettings(model=str(m.path), ctx_size=256, n_parallel=2, threads=2,
                                           medusa_heads=str(tmp_path / "eos.safetensors"),
                                           medusa_tree="[[0], [0, 0], [0, 0, 0]]", prompt_lookup="off"))
    service.load()
    try:
        for ignore_eos in (False, True):
            held_at_depth_1 = []
            for bias in (3.0, 3.5, 2.5, 4.0):
                kw = dict(prompt="ha ha ha ha ha", max_tokens=30, temperature=0.0, logit_bias={m.eos: bias},
                          ignore_eos=ignore_eos)
                with Speculated(service) as ran:
                    got = run_one(service, **kw).choices[0]
                want = run_one(model_service, **kw).choices[0]
                assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason, bias
                if ignore_eos:
                    assert m.eos in got.token_ids and len(got.token_ids) == 30  # passed through, generation went on
                else:
                    assert got.finish_reason == "stop" and len(got.token_ids) < 30 and m.eos not in got.token_ids
                if ran.accepted[1] >= 1:  # a draft's EOS accepted at depth 1
                    held_at_depth_1.append(bias)
                    break
            assert held_at_depth_1, "no bias ended the text at depth 1 of a draft"
    finally:
        service.engine.shutdown()


def test_typical_acceptance_is_opt_in_and_seed_reproducible(medusa_service):
    spec = medusa_service.speculator
    assert not spec.typical and medusa_service.medusa_report().acceptance == "lossless"  # off unless asked for
    kw = dict(count=3, temperature=0.7, seed=99)
    taken = spec.stats.typical_accepted
    lossless = tokens(medusa_service, reqs(**kw), together=False)
    assert spec.stats.typical_accepted == taken
    spec.typical = True
    try:
        a = tokens(medusa_service, reqs(**kw), together=False)
        assert spec.stats.typical_accepted > taken  # it took draft tokens without sampling them
        b = tokens(medusa_service, reqs(**kw), together=False)
    finally:
        spec.typical = False
    assert a == b and all(len(x) == n for x, n in zip(a, LENGTHS))
    assert a != lossless  # not lossless: the draws fall elsewhere


def test_max_streams_gates_speculation(medusa_service):
    """MEDUSA_MAX_STREAMS: speculate only while at most that many sequences decode."""
    spec = medusa_service.speculator
    same = [GenerationRequest(id=f"m{next(_ids)}", prompt=PROMPTS[1], max_tokens=40, temperature=0.0) for _ in range(3)]
    with Speculated(medusa_service) as open_gate:
        wide = run_requests(medusa_service, same)
    spec.max_streams = 1
    try:
        again = [r.model_copy(update={"id": f"m{next(_ids)}"}) for r in same]
        with Speculated(medusa_service) as gated:
            narrow = run_requests(medusa_service, again)
        alone = run_requests(medusa_service, [r := same[0].model_copy(update={"id": f"m{next(_ids)}"})])[r.id]
    finally:
        spec.max_streams = 8
    assert [wide[r.id].choices[0].token_ids for r in same] == [narrow[r.id].choices[0].token_ids for r in again]
    assert open_gate.steps >= 15  # three streams, each speculating
    # Gated: only the steps in which one stream decodes alone (while the others prefill or after
    # they finished) speculate.
    assert gated.steps <= 6
    assert alone.choices[0].token_ids == wide[same[0].id].choices[0].token_ids


def test_a_branching_tree_is_refused_at_load_with_its_reason(model_service, medusa_service):
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=256, n_parallel=1,
                                           medusa_heads=medusa_service.settings.medusa_heads,
                                           medusa_tree="[[0], [1], [0, 0]]"))
    service.load()
    assert service.health().status == "error"
    assert "one path per sequence" in service.error and "unified KV cache" in service.error


def test_typical_acceptance_never_bypasses_the_sampler_chain(model_service, tmp_path):
    # Heads whose vocabulary is the one token " ": they always propose it, and after "1" the model
    # itself finds " " likely, so typical acceptance would take it; a bias of -100 must still win.
    from backend.spec.heads import Head, MedusaHeads

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
    from backend.spec.heads import heads_from_state_dict
    from tests.test_medusa_units import fd_state

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
        assert service.error is None and service.info.medusa is False
        assert service.speculator.heads is None and not service.speculator.on  # prompt lookup stays
    finally:
        service.engine.shutdown()


def test_without_a_tree_the_server_measures_costs_and_plans_each_step(model_service, medusa_service, plain_greedy):
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4,
                                           threads=2, medusa_heads=medusa_service.settings.medusa_heads))
    service.load()
    try:
        spec = service.speculator
        assert service.error is None and not spec.pinned and spec.note == "planned per step"
        # Verify decodes of 1..7 rows and shared steps of 1..4 sequences, measured at load.
        assert set(spec.chain.ms) >= set(range(1, 8)) and set(spec.batch.ms) >= {1, 2, 3, 4}
        assert tokens(service, reqs(), together=False) == plain_greedy
        assert tokens(service, reqs(), together=True) == plain_greedy
        verified = sum(st.steps for st in spec.verified.values())
        judged = spec.judged["medusa"].judged
        assert verified > 20 and judged and judged[0] > 20  # drafts were verified, and judged
        assert spec.decisions["verify"] + spec.decisions["plain"] >= sum(len(t) for t in plain_greedy) // 7
    finally:
        service.engine.shutdown()


def test_the_shipped_heads_are_found_and_keep_greedy_exact(model_service, plain_greedy):
    # MEDUSA_HEADS=auto finds heads/<GGUF stem>/heads.safetensors, trained by backend.medusa.train.
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4,
                                           threads=2, medusa_tree="[[0], [0, 0], [0, 0, 0]]", medusa_max_streams=8,
                                           prompt_lookup="off"))
    service.load()
    try:
        assert service.error is None and service.info.medusa
        assert tokens(service, reqs(), together=False) == plain_greedy
        assert tokens(service, reqs(), together=True) == plain_greedy
        st = service.speculator.stats
        assert st.tokens / st.steps > 1.3  # trained heads: a good share of drafts accepted
    finally:
        service.engine.shutdown()


def test_prompt_cache_with_medusa_is_plain_greedy(medusa_service, model_service):
    """A conversation's next turn served from the prompt cache while Medusa speculates gives the
    tokens plain decoding gives (the plain side: tests/test_prompt_cache.py proves it cold-exact)."""
    first = run_one(medusa_service, prompt=LONG_PROMPTS[0], temperature=0.0, max_tokens=24)
    follow = LONG_PROMPTS[0] + first.choices[0].text + " And then the youngest trader asked"
    with Speculated(medusa_service) as ran:
        warm = run_one(medusa_service, prompt=follow, temperature=0.0, max_tokens=40)
    plain = run_one(model_service, prompt=follow, temperature=0.0, max_tokens=40)
    assert warm.prompt.cached_tokens > 0 and ran.steps > 0
    assert warm.choices[0].token_ids == plain.choices[0].token_ids
