"""The prompt cache: its plans as pure functions, the measured fact it rests on, and exactness on the
real default model (a request served from the cache gives token for token, logprob for logprob,
what it gives on a server without one)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from backend.config import BackendSettings
from backend.decode_plan import (
    MIXED,
    NONE,
    TILED,
    TILED_FROM_ROWS,
    VEC,
    CellRules,
    canonical_ends,
    classes_of,
    cold_chunks,
    exact_plan,
    tiled_chunks,
)
from backend.local import run_requests
from backend.ram_tier import RamTier, common_prefix
from backend.runtime import ModelService
from backend.slots import pick_slot
from common.protocol import GenerationRequest
from tests.test_engine import LONG_PROMPTS

_ids = iter(range(10**9))


# --- plans, without a model ----------------------------------------------------------------------
RULES = [CellRules(), CellRules(7, True), CellRules(3, True), CellRules(7, False)]


def _random_spans(rng: random.Random, n: int) -> list[tuple[int, int]] | None:
    if rng.random() < 0.3:
        return None
    spans, pos = [], 0
    for _ in range(rng.randint(0, 3)):
        a = rng.randint(pos, n)
        b = rng.randint(a, min(n, a + 120))
        if b > a:
            spans.append((a, b))
        pos = b
    return spans


@pytest.mark.parametrize("chunk", [64, 100, 256])
def test_exact_plan_computes_every_cell_as_the_cold_schedule_would(chunk):
    """Whatever the cache holds (the cells of an earlier prompt's schedule, then decoded ones), the
    plan reuses only cells of the class the cold schedule writes there and computes the rest in
    chunks that write that class; a class no chunking reproduces (NONE) is computed by its own cold
    chunk exactly."""
    rng = random.Random(chunk)
    for _ in range(3000):
        rules = rng.choice(RULES)
        n = rng.randint(1, 1500)
        spans = _random_spans(rng, n)
        m = rng.randint(1, n + 10)  # an earlier prompt sharing a prefix, then its decoded tokens
        earlier = classes_of(canonical_ends(m, chunk, [s for s in spans if s[1] <= m] if spans else spans, rules), rules)
        cached = (earlier + bytes([VEC]) * rng.randint(0, 60))[: rng.randint(0, n + 10)]
        shared = rng.randint(0, len(cached))
        reuse, ends = exact_plan(n, chunk, spans, rules, shared, cached)
        cold = canonical_ends(n, chunk, spans, rules)
        want = classes_of(cold, rules)
        assert 0 <= reuse <= min(shared, n - 1) and ends[-1] == n
        assert all(cached[i] == want[i] != NONE for i in range(reuse))
        starts = [reuse] + ends[:-1]
        assert all(a < b for a, b in zip(starts, ends))
        cold_pairs = set(zip([0] + cold[:-1], cold))
        for a, b in zip(starts, ends):
            assert b - a <= max(chunk, TILED_FROM_ROWS - 1)  # fits BATCH_SIZE (config checks it)
            got = rules.of(b - a)
            assert all(want[i] == got for i in range(a, b)), (n, spans, reuse, ends, a, b)
            if got == NONE:
                assert (a, b) in cold_pairs
        if reuse == 0:
            assert ends == cold


def test_canonical_schedule_runs_answers_as_decoded():
    r = CellRules(7, True)
    assert canonical_ends(600, 256, None, r) == cold_chunks(600, 256) == canonical_ends(600, 256, [(100, 120)], CellRules())
    recompute = CellRules(7, True, answers=False)  # PROMPT_CACHE_ANSWERS=recompute
    assert canonical_ends(600, 256, [(100, 120)], recompute) == cold_chunks(600, 256)
    # system + first message to 300 (256 + 44), the answer 300..318 in chunks of 7, then the next message
    assert canonical_ends(340, 256, [(300, 318)], r) == [256, 300, 307, 314, 318, 340]
    assert classes_of([256, 300, 307, 314, 318, 340], r) == bytes([TILED] * 256 + [MIXED] * 44 + [VEC] * 18 + [MIXED] * 22)


def test_exact_plan_examples():
    t = CellRules()
    tiled = bytes([TILED])
    assert exact_plan(1994, 256, None, t, 1900, tiled * 1900) == (1900, [1994])  # a next turn: only the new rows
    assert exact_plan(1950, 256, None, t, 1930, tiled * 1930) == (1886, [1950])  # at least 64 rows: back off
    assert exact_plan(2060, 256, None, t, 2055, tiled * 2055) == (2048, [2060])  # a 12-row last chunk, as cold
    assert exact_plan(2060, 256, None, t, 1000, tiled * 1000) == (960, [1024, 1280, 1536, 1792, 2048, 2060])
    assert exact_plan(40, 256, None, t, 39, bytes([MIXED]) * 39) == (0, [40])  # short chunks unknown: nothing
    assert exact_plan(40, 256, None, CellRules(7, True), 39, bytes([MIXED]) * 39) == (32, [40])  # measured: reused
    r = CellRules(7, True)
    turn1 = classes_of(canonical_ends(300, 256, [], r), r)
    answer = bytes([VEC]) * 17  # 18 tokens generated: the last one has no cell
    assert exact_plan(340, 256, [(300, 318)], r, 317, turn1 + answer) == (317, [318, 340])
    assert tiled_chunks(100, 130, 256) == (66, [130])


def test_pick_slot_prefers_reuse_then_packed_ids_then_least_recent():
    assert pick_slot([(0, 0, 5), (1, 700, 9), (2, 0, 1)], busy=set()) == 1
    assert pick_slot([(0, 0, 5), (2, 0, 1)], busy=set()) == 2  # least recently used
    assert pick_slot([(0, 0, 5), (3, 0, 1)], busy={1}) == 0  # keeps ids 0,1 packed
    assert pick_slot([(0, 64, 5), (3, 0, 1)], busy={2}) == 0  # reuse first


def test_ram_tier_keeps_the_longest_prefix_within_its_bytes():
    tier = RamTier(capacity_bytes=300)
    a, b = np.arange(100, dtype=np.int32), np.arange(50, 150, dtype=np.int32)
    assert tier.put(a, np.zeros(100, np.uint8)) and tier.put(b, np.zeros(100, np.uint8))
    assert not tier.put(a[:60], np.zeros(10, np.uint8))  # already held
    prompt = np.concatenate([a[:80], [7, 7]]).astype(np.int32)
    key, shared = tier.best(prompt)
    assert shared == 80 and tier.get(key).tokens is not None
    assert tier.put(np.concatenate([a, [1, 2]]).astype(np.int32), np.zeros(120, np.uint8))  # replaces a
    assert len(tier) == 2 and tier.bytes == 220
    assert tier.put(np.arange(500, 600, dtype=np.int32), np.zeros(150, np.uint8))  # evicts the least recent (b)
    assert tier.best(b)[1] == 0 and tier.bytes <= 300
    assert not tier.put(np.arange(9, dtype=np.int32), np.zeros(301, np.uint8))
    assert common_prefix(np.array([1, 2, 3]), np.array([1, 2])) == 2


# --- the fact: tiled cells do not depend on the chunking --------------------------------------------
def test_tiled_cells_do_not_depend_on_chunk_length_or_start(model_service):
    """The rule the cache rests on, measured on the real model: a prompt prefilled in chunks of 64+
    rows on any boundaries gives bit-identical logits; chunks under 64 rows give other numbers."""
    tokens = model_service.model.tokenize(LONG_PROMPTS[0] + LONG_PROMPTS[1], True)[:700]

    def prefill(sizes):
        def run(m):
            seq = next(s.seq_id for s in model_service.engine.slots.slots if not s.busy)
            m.seq_rm(seq)
            pos = 0
            for n in sizes:
                m.batch_clear()
                for p in range(pos, pos + n):
                    m.batch_add(tokens[p], p, seq, p == len(tokens) - 1)
                assert m.decode() == 0
                pos += n
            out = m.logits(sizes[-1] - 1).astype(np.float64).copy()
            m.seq_rm(seq)
            return out
        return model_service.engine.call(run)

    cold = prefill([256, 256, 188])
    assert np.array_equal(prefill([100, 300, 64, 236]), cold)
    assert np.array_equal(prefill([64] * 9 + [124]), cold)
    assert not np.array_equal(prefill([40] * 17 + [20]), cold)  # per-row path: other numbers


# --- exactness on the real model ------------------------------------------------------------------
def _turn(service, prompt: str, max_tokens: int = 16):
    r = GenerationRequest(id=f"c{next(_ids)}", prompt=prompt, temperature=0.0, max_tokens=max_tokens, logprobs=0)
    return r, run_requests(service, [r])[r.id]


@pytest.fixture(scope="module")
def cold_service(model_service):
    """The same model without a prompt cache: what a fresh server computes."""
    with ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=4, threads=2,
                                      medusa_heads="none", prompt_cache="off")) as service:
        yield service


def _same(a, b) -> None:
    ca, cb = a.choices[0], b.choices[0]
    assert ca.token_ids == cb.token_ids
    assert [e.logprob for e in ca.logprobs] == [e.logprob for e in cb.logprobs]


def _conversation(system: str, turn: int, answers: list[str]) -> str:
    text = system
    for k, answer in enumerate(answers):
        text += f"\nUser: question {k} about the text?\nAssistant:{answer}"
    return text + f"\nUser: question {turn} about the text?\nAssistant:"


def test_multi_turn_conversation_is_exact_and_reuses(model_service, cold_service):
    system = LONG_PROMPTS[0]
    answers: list[str] = []
    cached = []
    for turn in range(4):
        prompt = _conversation(system, turn, answers)
        _, warm = _turn(model_service, prompt)
        _, cold = _turn(cold_service, prompt)
        _same(warm, cold)
        assert cold.prompt.cached_tokens == 0
        cached.append((warm.prompt.cached_tokens, warm.prompt.prompt_tokens))
        answers.append(warm.choices[0].text)
    # Turns >= 2 reuse all but a few dozen tokens: the earlier answers were re-prefilled while idle.
    for reused, total in cached[1:]:
        assert total - reused <= 2 * TILED_FROM_ROWS, cached
    assert model_service.engine.slots.stats().canonicalized_tokens > 0


def test_concurrent_conversations_and_n_choices_are_exact(model_service, cold_service):
    systems = [LONG_PROMPTS[0], LONG_PROMPTS[1], "Notes. " + LONG_PROMPTS[1], LONG_PROMPTS[0][:1500]]
    answers = [[] for _ in systems]
    for turn in range(3):
        prompts = [_conversation(s, turn, a) for s, a in zip(systems, answers)]
        reqs = [GenerationRequest(id=f"c{next(_ids)}", prompt=p, temperature=0.0, max_tokens=12, logprobs=0) for p in prompts]
        together = run_requests(model_service, reqs)
        for r, ans in zip(reqs, answers):
            _, cold = _turn(cold_service, r.prompt, max_tokens=12)
            got = together[r.id]
            _same(got, cold)
            ans.append(got.choices[0].text)
        if turn:
            assert all(together[r.id].prompt.cached_tokens > 0 for r in reqs)
    # n > 1 from the cache: prefilled once, copied, each choice what the seeded single request gives.
    prompt = _conversation(systems[0], 3, answers[0])
    r = GenerationRequest(id=f"c{next(_ids)}", prompt=prompt, temperature=1.0, seed=11, n=3, max_tokens=10)
    warm = run_requests(model_service, [r])[r.id]
    assert warm.prompt.cached_tokens > 0
    for i in range(3):
        single = GenerationRequest(id=f"c{next(_ids)}", prompt=prompt, temperature=1.0, seed=11 + i, max_tokens=10)
        assert run_requests(cold_service, [single])[single.id].choices[0].token_ids == warm.choices[i].token_ids


def _rotate(service, cold_service, systems: list[str]) -> list:
    """Each conversation's first turn, then each one's second turn, checked against a fresh server."""
    firsts = {i: _turn(service, _conversation(s, 0, []))[1].choices[0].text for i, s in enumerate(systems)}
    seconds = []
    for i, s in enumerate(systems):
        prompt = _conversation(s, 1, [firsts[i]])
        _, warm = _turn(service, prompt)
        _, cold = _turn(cold_service, prompt)
        _same(warm, cold)
        seconds.append(warm.prompt)
    return seconds


def test_parked_streams_serve_sixteen_long_conversations_over_four_slots_exactly(model_service, cold_service):
    """16 conversations rotating over 4 slots, each prompt past Gemma 3's 512-position sliding window:
    the conversations wait in parked streams (PARKED_SEQS, 3 x 4 + 1 here), copied whole, and each next turn
    reuses its whole first turn and gives, token id and logprob, what a fresh server gives."""
    text = LONG_PROMPTS[0] + LONG_PROMPTS[1]
    systems = [f"Record {i}: " + text[i * 7:i * 7 + 3000] for i in range(16)]
    assert model_service.model.n_parked == 13 and model_service.model.n_swa == 512
    before = model_service.engine.slots.stats()
    seconds = _rotate(model_service, cold_service, systems)
    after = model_service.engine.slots.stats()
    for i, p in enumerate(seconds):
        assert p.prompt_tokens > 600 and p.cached_tokens >= 512, (i, p)
    assert after.parked_restores - before.parked_restores >= 12  # at most 4 of 16 still sat in a slot
    assert after.parked_seqs == 13


def test_past_the_parked_streams_the_ram_tier_restores_within_the_window(model_service):
    """With fewer parked streams than idle conversations, the least recently parked go to the RAM tier,
    whose restores are exact within the sliding window (~350-token prompts here); each next turn gives
    what a fresh server gives. (Each restore first parks the slot it lands in: the copy out of that
    slot runs before the restore writes it, backend/llama_model.py.)"""
    with ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=2, threads=2,
                                      medusa_heads="none", prompt_lookup="off", parked_seqs=2)) as service, \
         ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=2, threads=2,
                                      medusa_heads="none", prompt_cache="off")) as cold:
        systems = [f"Record {i}: " + LONG_PROMPTS[i % 2][i * 7:i * 7 + 1500] for i in range(8)]
        seconds = _rotate(service, cold, systems)
        stats = service.engine.slots.stats()
    assert all(p.cached_tokens >= 256 for p in seconds), seconds
    assert stats.parked_saves >= 6 and stats.ram_restores >= 6 and stats.ram_bytes <= stats.ram_capacity_bytes


def test_fast_mode_reuses_every_cell(model_service):
    """PROMPT_CACHE=fast reuses the cells of generated tokens too: only the new message is prefilled."""
    with ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=2, threads=2,
                                      medusa_heads="none", prompt_cache="fast")) as service:
        prompt = _conversation(LONG_PROMPTS[1], 0, [])
        _, first = _turn(service, prompt)
        follow = _conversation(LONG_PROMPTS[1], 1, [first.choices[0].text])
        _, second = _turn(service, follow)
        assert second.prompt.prompt_tokens - second.prompt.cached_tokens < 40
        assert service.stats().prompt_cache.mode == "fast"


def test_chat_history_reuses_the_cells_of_the_answer(model_service):
    """Through the chat template (the default model's transcript fallback): the answer a client sends
    back, as it was streamed (" We ..."), renders into the tokens it was generated as, so the next turn
    prefills only its new message."""
    from common.protocol import ChatMessage

    with ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=1024, n_parallel=2, threads=2,
                                      medusa_heads="none", prompt_cache="fast")) as service:
        assert service.template.source == "transcript"
        msgs = [ChatMessage(role="system", content=LONG_PROMPTS[1][:1200]),
                ChatMessage(role="user", content="What is this text about?")]
        r = GenerationRequest(id=f"c{next(_ids)}", messages=msgs, temperature=0.0, max_tokens=24)
        first = run_requests(service, [r])[r.id]
        answer = first.choices[0].text
        assert answer[:1].isspace(), answer  # the model writes the space after "Assistant:"
        msgs += [ChatMessage(role="assistant", content=answer), ChatMessage(role="user", content="Say more.")]
        r = GenerationRequest(id=f"c{next(_ids)}", messages=msgs, temperature=0.0, max_tokens=4)
        second = run_requests(service, [r])[r.id].prompt
        assert second.cached_tokens >= first.prompt.prompt_tokens + first.choices[0].completion_tokens - 2, second
        assert second.prompt_tokens - second.cached_tokens < 16, second


def test_chat_turns_reuse_their_answers_as_decoded_and_stay_exact(model_service, cold_service):
    """Exact mode, chat: an earlier answer's cells are reused as its decode steps wrote them (the cold
    schedule computes answers in decode-sized chunks, decode_plan.canonical_ends; an answer cut by
    max_tokens gets its last token's cell right after), so each next turn prefills only its new message, and
    gives, token id and logprob, what a fresh server gives. An answer sent back changed is
    recomputed and stays exact."""
    from common.protocol import ChatMessage

    assert model_service.limit.cell_rules.segments  # measured at load on this CPU
    msgs = [ChatMessage(role="system", content=LONG_PROMPTS[1][:1400])]
    for turn, (question, max_tokens, edit) in enumerate([("What is this text about?", 24, str),
                                                          ("Say more.", 9, str),  # cut by max_tokens
                                                          ("And then?", 12, lambda a: " Well," + a),
                                                          ("Thanks. One more detail?", 12, str)]):
        msgs.append(ChatMessage(role="user", content=question))
        r = GenerationRequest(id=f"c{next(_ids)}", messages=list(msgs), temperature=0.0, max_tokens=max_tokens, logprobs=0)
        warm = run_requests(model_service, [r])[r.id]
        cold = run_requests(cold_service, [r.model_copy(update={"id": f"c{next(_ids)}"})])
        _same(warm, next(iter(cold.values())))
        new = len(model_service.model.tokenize(f"\nUser: {question}\nAssistant:", add_special=False))
        if turn in (1, 2):  # the answer before came back as generated, its last token decoded meanwhile
            assert warm.prompt.prompt_tokens - warm.prompt.cached_tokens <= new, warm.prompt
        if turn == 3:  # it came back changed: its tokens are recomputed in decode-sized chunks
            assert 0 < warm.prompt.cached_tokens < warm.prompt.prompt_tokens - new
        msgs.append(ChatMessage(role="assistant", content=edit(warm.choices[0].text)))
        deadline = time.monotonic() + 10  # a cut answer's last token gets its cell as soon as nothing runs
        while model_service.engine.slots.has_tail_work() and time.monotonic() < deadline:
            time.sleep(0.01)
