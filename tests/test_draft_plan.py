"""The speculation plan and the prompt-lookup drafter as pure functions (no model): expectations worked
out by hand."""

from __future__ import annotations

import pytest

from backend.spec.draft_plan import (
    Choice,
    CostTable,
    DepthCounts,
    Option,
    blended,
    choose,
    expected_tokens,
    judge,
)
from backend.spec.lookup import NgramIndex

# A small model's curve (ms): a verify of 2 rows costs 1.1 plain tokens, 4 rows 1.5; four sequences'
# shared step costs 1.5 of one.
CHAIN = CostTable({1: 20.0, 2: 22.0, 3: 25.0, 4: 30.0, 7: 45.0})
BATCH = CostTable({1: 20.0, 2: 22.0, 3: 26.0, 4: 30.0})


def test_judge_counts_the_matching_prefix_or_waits():
    assert judge([5, 6, 7], [5, 6, 9, 1]) == (3, 2)  # depth 2 judged and rejected
    assert judge([5, 6, 7], [4]) == (1, 0)
    assert judge([5, 6, 7], [5, 6, 7, 8]) == (3, 3)
    assert judge([5, 6, 7], [5, 6]) is None  # depth 2 not known yet
    assert judge([], [1]) == (0, 0)


def test_depth_counts_and_the_blended_estimate():
    c = DepthCounts()
    c.add(3, 2)  # judged 0,1,2; accepted 0,1
    c.add(1, 0)
    assert c.judged == [2, 1, 1] and c.accepted == [1, 1, 0]
    assert c.as_list() == [0.5, 1.0, 0.0]
    prior = DepthCounts([10, 5], [8, 1])  # 0.8, 0.2
    # own 1/2 at depth 0 with the prior 0.8 worth 4 judgements: (1 + 3.2) / 6
    assert blended(c, prior, 0) == pytest.approx(4.2 / 6)
    assert blended(None, prior, 1) == pytest.approx(0.2)
    assert blended(None, prior, 2) == 0.5  # never judged anywhere: the default
    assert blended(c, None, 2, default=0.25) == pytest.approx((0 + 4 * 0.25) / 5)


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0, 1.0, 1.0], 3) == 4.0


def test_cost_table_interpolates_extrapolates_and_follows_timings():
    t = CostTable({1: 20.0, 3: 30.0})
    assert t(2) == 25.0 and t(0) == 0.0
    assert t(5) == 40.0  # the last slope (5 ms a row) beyond the largest size
    single = CostTable({2: 10.0})
    assert single(1) == 5.0 and single(4) == 20.0
    t.observe(1, 40.0)
    assert t(1) == pytest.approx(20.0 + 0.05 * 20.0)
    t.observe(7, 70.0)  # a size never measured takes the timing as it is
    assert t(7) == 70.0


def test_one_stream_verifies_the_length_that_pays_most():
    # 0.9, 0.9, 0.5: E(1) = 1.9 for 22 ms, E(2) = 2.71 for 25 ms, E(3) = 3.115 for 30 ms.
    # Rates against plain 1/20: gains E - chain/20 = 0.8, 1.46, 1.615 -> length 3 (0.1038 tok/ms > 0.05).
    opt = Option("medusa", (1, 2, 3), (0.9, 0.9, 0.5))
    assert choose([[opt]], CHAIN, BATCH) == [Choice("medusa", (1, 2, 3), pytest.approx(3.115))]
    # A poor draft: E(1) = 1.05 for 22 ms is slower than plain (0.0477 < 0.05 tok/ms): no verify.
    assert choose([[Option("medusa", (1,), (0.05,))]], CHAIN, BATCH) == [None]


def test_a_lone_sequence_with_a_companion_row_verifies_any_draft_token_in_its_place():
    # Plain decoding of a lone sequence past position 255 takes 2 rows (decode_plan's companion):
    # it costs chain(2) = 22 ms, what a verify of one draft token costs. The 5% draft that plain's
    # 1 row (20 ms) beat now pays: E(1) = 1.05 tokens for the same 22 ms.
    poor = Option("medusa", (1,), (0.05,))
    assert choose([[poor]], CHAIN, BATCH, lone_plain_rows=2) == [Choice("medusa", (1,), pytest.approx(1.05))]
    # A second token still has to pay for its own row: 0.05 * 0.5 more tokens for 3 ms more does not.
    assert choose([[Option("medusa", (1, 2), (0.05, 0.5))]], CHAIN, BATCH, lone_plain_rows=2)[0].draft == (1,)
    # Only a lone sequence takes a companion: two streams share one decode as before.
    assert choose([[poor], [poor]], CHAIN, BATCH, lone_plain_rows=2) == [None, None]


def test_the_better_source_wins_and_drafts_are_cut_where_they_stop_paying():
    medusa = Option("medusa", (1, 2, 3), (0.6, 0.5, 0.4))
    lookup = Option("lookup", (7, 8, 9, 10, 11, 12), (0.95,) * 6)
    got = choose([[medusa, lookup]], CHAIN, BATCH)[0]
    assert got.source == "lookup" and got.draft == (7, 8, 9, 10, 11, 12)
    # Same lookup with fading acceptance: depths past 2 add little, and 5..7 rows cost 35-45 ms:
    # gains at plain rate 0.05: L=1 0.8, L=2 1.165, L=3 1.1015 ... -> L=2.
    fading = Option("lookup", (7, 8, 9, 10, 11, 12), (0.9, 0.5, 0.1, 0.1, 0.1, 0.1))
    assert choose([[fading]], CHAIN, BATCH)[0].draft == (7, 8)


def test_under_load_only_drafts_that_beat_the_shared_step_verify():
    # Four streams: plain gives 4 tokens in 30 ms (0.133 tok/ms). A modest Medusa draft (E(1) = 1.6
    # for 22 ms) does not pay there; a sure lookup draft of 6 (E = 7 for 45 ms) does: 1 verifying
    # (7 + 3 tokens in 45 + 26 ms = 0.141) beats none; adding the second sure one (14 + 2 in 90 + 22
    # = 0.143) beats that too; the Medusa ones stay in the shared decode.
    modest = [Option("medusa", (1,), (0.6,))]
    sure = [Option("lookup", (1, 2, 3, 4, 5, 6), (1.0,) * 6)]
    got = choose([modest, sure, modest, sure], CHAIN, BATCH)
    assert [c.source if c else None for c in got] == [None, "lookup", None, "lookup"]
    assert choose([modest] * 4, CHAIN, BATCH) == [None] * 4
    assert [c is not None for c in choose([sure] * 4, CHAIN, BATCH, max_verifying=1)] == [True, False, False, False]


def test_pinned_verifies_every_draft_whole():
    poor = Option("medusa", (1, 2, 3), (0.05, 0.05, 0.05))
    got = choose([[poor], [], [poor]], CHAIN, BATCH, pinned=True)
    assert [c.draft if c else None for c in got] == [(1, 2, 3), None, (1, 2, 3)]
    assert choose([[poor], [poor]], CHAIN, BATCH, pinned=True, max_verifying=1)[1] is None


def test_ngram_index_proposes_what_followed_the_latest_match():
    idx = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3])
    assert idx.propose(3) == ([4, 5, 9], 2)  # "2 3" occurred before, followed by 4 5 9
    idx.extend([4, 7])
    assert idx.propose(4) == ([], 0)  # nothing ever ended in 7 before
    idx = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3])
    idx.extend([4])
    assert idx.propose(2) == ([5, 9], 3)  # the longest match wins: "2 3 4"
    assert NgramIndex([8, 8, 8]).propose(4) == ([8], 2)  # its own suffix never matches itself
    assert NgramIndex([5]).propose(3) == ([], 0)
    idx = NgramIndex([1, 2, 1, 3, 1])
    assert idx.propose(2) == ([3, 1], 1)  # the latest occurrence of "1" (position 2), not the first
    # A long prompt is indexed a budget of positions per proposal, earliest first.
    idx = NgramIndex([9, 5, 6, 7] + [0] * 20 + [9])
    assert idx.propose(3, budget=2) == ([5, 6, 7], 1)  # "9" at position 0 is indexed already
    idx = NgramIndex([1, 2] + [0] * 20 + [5, 6, 5])
    assert idx.propose(3, budget=4) == ([], 0)  # "5" (position 22) is not indexed yet...
    assert idx.propose(3, budget=100) == ([6, 5], 1)  # ...then it is
