"""Medusa's pieces without a model: trees as data, acceptance rules, head loading, tuning plans."""

from __future__ import annotations

import numpy as np
import pytest

from backend.spec.heads import HeadsError, heads_from_state_dict, load_heads
from backend.medusa.planning import plan
from backend.spec.draft_plan import expected_tokens
from backend.spec.tree import (
    TreeError,
    candidates,
    chain,
    load_tree,
    parse_choices,
    path_ranks,
    typical_ok,
    validate,
)
from backend.spec.verify import verify

H, V = 16, 50


def fd_state(n_heads: int, layers: int = 1, vocab: int = V, hidden: int = H, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict in FasterDecoding's medusa_lm_head key layout."""
    rng = np.random.default_rng(seed)
    sd = {}
    for h in range(n_heads):
        for layer in range(layers):
            sd[f"{h}.{layer}.linear.weight"] = rng.normal(0, 0.2, (hidden, hidden)).astype(np.float32)
            sd[f"{h}.{layer}.linear.bias"] = rng.normal(0, 0.2, hidden).astype(np.float32)
        sd[f"{h}.{layers}.weight"] = rng.normal(0, 1, (vocab, hidden)).astype(np.float32)
    return sd


def reference_topk(sd: dict, n_heads: int, layers: int, x: np.ndarray, k: int) -> np.ndarray:
    import torch

    out = []
    for h in range(n_heads):
        t = torch.tensor(x)
        for layer in range(layers):
            lin = torch.nn.Linear(H, H)
            lin.weight.data = torch.tensor(sd[f"{h}.{layer}.linear.weight"])
            lin.bias.data = torch.tensor(sd[f"{h}.{layer}.linear.bias"])
            t = t + torch.nn.functional.silu(lin(t))
        logits = t @ torch.tensor(sd[f"{h}.{layers}.weight"]).T
        out.append(torch.topk(logits, k).indices.numpy())
    return np.stack(out)


def test_choices_parse_from_json_python_and_medusa_choices_lines():
    assert parse_choices("[[0], [0, 0], [1]]") == [(0,), (0, 0), (1,)]
    assert parse_choices("[(0,), (0, 1)]") == [(0,), (0, 1)]
    assert parse_choices("vicuna_7b_stage2 = [(0,), (0, 0), (0, 0, 0)]") == chain(3)
    assert parse_choices('{"choices": [[0]], "enabled": true}') == [(0,)]
    for bad in ("[[0], []]", "[[-1]]", "[0, 1]", "not a list"):
        with pytest.raises(TreeError):
            parse_choices(bad)


def test_tree_file_from_the_tuning(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text('{"enabled": true, "choices": [[0], [0, 0]], "max_streams": 2}')
    choices, tuning = load_tree(str(f))
    assert choices == chain(2) and tuning["max_streams"] == 2
    assert load_tree("[[0]]") == ([(0,)], {})


def test_validate_rejects_orphans_repeats_and_too_deep_nodes():
    validate([(0,), (0, 1), (1,)], n_heads=2)
    with pytest.raises(TreeError, match="no parent"):
        validate([(0,), (1, 0)], n_heads=2)
    with pytest.raises(TreeError, match="repeat"):
        validate([(0,), (0,)], n_heads=2)
    with pytest.raises(TreeError, match="deeper"):
        validate(chain(3), n_heads=2)


def test_a_path_gives_its_ranks_and_a_branching_tree_is_refused():
    assert path_ranks([(0, 0), (0,), (0, 0, 1)]) == [0, 0, 1]
    with pytest.raises(TreeError, match="one path per sequence"):
        path_ranks([(0,), (1,)])
    proposals = np.array([[5, 6], [7, 8], [9, 10]])
    assert candidates(proposals, [0, 1, 0]) == [5, 8, 9]


def test_greedy_acceptance_is_the_longest_confirmed_prefix():
    def walk(draft, targets, finish_at=None):
        taken = []

        def choose_row(row):
            taken.append(targets[row])
            return targets[row], row == finish_at

        return verify(draft, choose_row), taken

    assert walk([5, 8, 9], [5, 8, 9, 4]) == (3, [5, 8, 9, 4])  # all confirmed: one more from the base
    assert walk([5, 8, 9], [5, 7, 9, 4]) == (1, [5, 7])  # the first miss ends the walk with its token
    assert walk([5, 8, 9], [4, 8, 9, 4]) == (0, [4])
    assert walk([], [3]) == (0, [3])
    assert walk([5, 8, 9], [5, 8, 9, 4], finish_at=1) == (2, [5, 8])  # the sequence ended (EOS, stop, limit)


def test_typical_acceptance_keeps_likely_tokens_only():
    logits = np.array([5.0, 1.0, 0.0, -1.0], dtype=np.float32)
    assert typical_ok(logits, 0, temperature=1.0, epsilon=0.09, alpha=0.3)
    assert not typical_ok(logits, 3, temperature=1.0, epsilon=0.09, alpha=0.3)
    flat = np.zeros(4, dtype=np.float32)  # high entropy: the threshold drops below 1/4
    assert typical_ok(flat, 2, temperature=1.0, epsilon=0.09, alpha=0.3)


def test_fasterdecoding_pt_checkpoint_counts_heads_from_keys(tmp_path):
    torch = pytest.importorskip("torch")
    sd = fd_state(n_heads=5)
    path = tmp_path / "medusa_lm_head.pt"
    torch.save({k: torch.tensor(v).half() for k, v in sd.items()}, path)  # published heads are fp16
    heads = load_heads(tmp_path, hidden_size=H, n_vocab=V)  # a directory finds the file
    assert heads.n_heads == 5
    x = np.random.default_rng(1).normal(size=(3, H)).astype(np.float32)
    sd16 = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}
    np.testing.assert_array_equal(heads.propose(x, 4), reference_topk(sd16, 5, 1, x, 4))


def test_several_resblocks_per_head_load_and_run():
    sd = fd_state(n_heads=2, layers=2)
    heads = heads_from_state_dict(sd)
    x = np.random.default_rng(2).normal(size=(1, H)).astype(np.float32)
    np.testing.assert_array_equal(heads.propose(x, 3), reference_topk(sd, 2, 2, x, 3))


def test_own_format_round_trips_with_a_token_map(tmp_path):
    sd = fd_state(n_heads=3, vocab=10)
    heads = heads_from_state_dict(sd)
    heads.token_map = np.array([3, 7, 11, 20, 21, 22, 30, 31, 40, 49])
    heads.save(tmp_path / "heads.safetensors")
    back = load_heads(tmp_path / "heads.safetensors", hidden_size=H, n_vocab=V)
    x = np.random.default_rng(3).normal(size=(2, H)).astype(np.float32)
    got = back.propose(x, 2)
    assert set(np.unique(got)) <= set(heads.token_map.tolist())
    np.testing.assert_array_equal(got, heads.propose(x, 2))


def test_heads_that_do_not_fit_the_model_fail_clearly(tmp_path):
    heads = heads_from_state_dict(fd_state(n_heads=2))
    with pytest.raises(HeadsError, match="hidden size 32"):
        heads.check(hidden_size=32, n_vocab=V)
    with pytest.raises(HeadsError, match="vocabulary has 60"):
        heads.check(hidden_size=H, n_vocab=60)
    broken = fd_state(n_heads=2)
    del broken["1.0.linear.bias"]
    with pytest.raises(HeadsError, match="missing 1.0.linear.bias"):
        heads_from_state_dict(broken)
    with pytest.raises(HeadsError, match="not found"):
        load_heads(tmp_path / "nope.safetensors", H, V)


def test_expected_tokens_follow_conditional_acceptance():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)


def test_plan_picks_the_fastest_length_or_stays_off():
    cost = {1: 18.0, 2: 20.0, 3: 23.0, 4: 28.0}
    batch = {1: 18.0, 2: 20.0, 3: 23.0, 4: 27.0}
    # By hand: E(1) = 1.6, E(2) = 1.6 + 0.6*0.5 = 1.9, E(3) = 1.9 + 0.6*0.5*0.4 = 2.02 tokens a step;
    # per ms: 1.6/20 = 0.0800, 1.9/23 = 0.0826, 2.02/28 = 0.0721, plain 1/18 = 0.0556: length 2 wins,
    # 1.9/23 * 18 = 1.487x. Two streams plainly batched give 2/20 = 0.1 > 0.0826: speculate alone only.
    good = plan([0.6, 0.5, 0.4], cost, batch)
    assert good == {
        "acceptance": [0.6, 0.5, 0.4],
        "cost_ms": {"1": 18.0, "2": 20.0, "3": 23.0, "4": 28.0},
        "batch_cost_ms": {"1": 18.0, "2": 20.0, "3": 23.0, "4": 27.0},
        "enabled": True,
        "choices": [[0], [0, 0]],
        "max_streams": 1,
        "expected_tokens_per_step": 1.9,
        "expected_speedup_one_stream": 1.487,
    }
    # Cheaper batches of two: 2/30 = 0.0667 < 0.0826, so speculation pays up to two streams, not three (3/31).
    assert plan([0.6, 0.5, 0.4], cost, {1: 18.0, 2: 30.0, 3: 31.0})["max_streams"] == 2
    # High acceptance makes the longest draft best: E(3) = 1 + .9 + .81 + .729 = 3.439, 3.439/28 > 2.71/23.
    assert plan([0.9, 0.9, 0.9], cost, batch)["choices"] == [[0], [0, 0], [0, 0, 0]]
    bad = plan([0.02, 0.0, 0.0], cost, batch)
    # Best is length 1: 1.02/20 = 51.0 tok/s against 1/18 = 55.6.
    assert bad["enabled"] is False and bad["choices"] == []
    assert bad["reason"] == ("no draft beats plain decoding: best is length 1 at 51.0 tok/s against 55.6 "
                             "(acceptance [0.02, 0.0, 0.0])")


class FakeSeq:
    """What the speculator reads of a sequence: its prompt, generated tokens, Medusa draft, grammar."""

    def __init__(self, prompt: list[int], draft: list[int]):
        from backend.spec.speculator import SequenceDrafts

        self.request = type("R", (), {"tokens": prompt})()
        self.tokens: list[int] = []
        self.draft = draft
        self.constraint = None
        self.drafts = SequenceDrafts()

    @property
    def generated(self) -> int:
        return len(self.tokens)


def test_the_speculator_follows_live_acceptance_judged_on_drafts_it_did_not_verify():
    from backend.spec.speculator import Speculator

    heads = heads_from_state_dict(fd_state(n_heads=3))
    costs = ({1: 20.0, 2: 22.0, 3: 25.0, 4: 30.0, 7: 45.0}, {1: 20.0, 2: 22.0})
    spec = Speculator(heads, chain(3), costs, lookup=True)
    seq = FakeSeq([1, 2, 3, 4, 5, 6, 7, 8], draft=[40, 41, 42])
    # Before anything is judged every depth is 0.5: gains E(L) - chain(L + 1) / 20 ms are 0.4 (L=1),
    # 0.5 (L=2: 1.75 - 25/20), 0.375 (L=3): two of Medusa's guesses; the prompt never repeats, so
    # lookup has nothing to offer.
    first = spec.plan([seq], 6, True)[0]
    assert first.source == "medusa" and first.draft == (40, 41)
    # The model writes other tokens, again and again: Medusa's drafts are judged wrong at depth 0.
    for t in range(20):
        seq.tokens.append(100 + t)
        seq.draft = [40, 41, 42]
        chosen = spec.plan([seq], 6, True)[0]
    assert chosen is None  # no longer worth a verify
    assert spec.judged["medusa"].judged[0] == 20 and spec.judged["medusa"].accepted == [0]
    assert spec.decisions == {"verify": 1, "plain": 20}
    # The text starts repeating an earlier span: lookup proposes what followed (never judged yet: 0.5
    # a depth, so two tokens of it, as for Medusa above), and it is right.
    seq.tokens += [1, 2, 3]
    chosen = spec.plan([seq], 6, True)[0]
    assert chosen.source == "lookup" and chosen.draft == (4, 5)
    seq.tokens += [4, 5, 6, 7, 8, 100]  # what followed "1 2 3" the first time, in the prompt and after it
    spec.plan([seq], 6, True)
    assert spec.judged["lookup"].accepted == [1] * 6
    assert spec.lookup_by_ngram[3].judged[0] == 1  # "1 2 3" matched: judged under its n-gram length


def test_max_streams_and_pinned_plans():
    from backend.spec.speculator import Speculator

    heads = heads_from_state_dict(fd_state(n_heads=3))
    costs = ({1: 20.0, 2: 22.0, 3: 25.0, 4: 30.0}, {1: 20.0, 2: 22.0})
    spec = Speculator(heads, chain(3), costs, lookup=False, max_streams=1, pinned=True)
    a, b = FakeSeq([1, 2], [5, 6, 7]), FakeSeq([1, 2], [5, 6, 7])
    assert [c.draft for c in spec.plan([a], 6, True)] == [(5, 6, 7)]  # pinned: whole, whatever it pays
    assert spec.plan([a, b], 6, True) == [None, None]  # two streams decode: over MEDUSA_MAX_STREAMS
    assert spec.drafts(np.zeros((1, H), np.float32), [7]) != [[]]
    spec.disable("off: test")
    assert not spec.on and not spec.active and spec.drafts(np.zeros((1, H), np.float32), [7]) == [[]]


def test_heads_run_only_as_deep_as_a_draft_could_pay():
    from backend.spec.draft_plan import DepthCounts
    from backend.spec.speculator import JUDGE_EVERY, Speculator

    heads = heads_from_state_dict(fd_state(n_heads=4))
    costs = ({1: 20.0, 2: 22.0, 3: 25.0, 4: 30.0, 5: 40.0}, {1: 20.0, 2: 22.0, 3: 26.0, 4: 30.0})
    spec = Speculator(heads, chain(4), costs, lookup=False)
    spec.judged["medusa"] = DepthCounts([100] * 4, [90, 60, 30, 10])  # 0.9, 0.6, 0.3, 0.1
    # One stream, plain rate 1/20: gains E(L) - chain(L+1)/20 = 0.8, 1.19 (L=2), 1.15, 0.80: two
    # guesses pay; the heads run three deep (the third keeps being judged); all four every 8th step.
    got = [spec.drafting(1) for _ in range(JUDGE_EVERY)]
    assert got[:-1] == [(3, True)] * (JUDGE_EVERY - 1) and got[-1] == (4, True)
    # Four streams (4 tokens in 30 ms): no draft pays; the heads run only on every 8th step, for one sequence.
    got = [spec.drafting(4) for _ in range(JUDGE_EVERY)]
    assert got[:-1] == [(0, False)] * (JUDGE_EVERY - 1) and got[-1] == (4, False)
    x = np.zeros((1, H), np.float32)
    assert len(spec.drafts(x, [7], 2)[0]) == 2 and len(spec.drafts(x, [7])[0]) == 4


def test_a_lone_sequence_past_the_split_kv_position_drafts_into_its_companion_row():
    """Past position 255 a lone sequence's plain decode takes a companion row (decode_plan), the
    shape of a 1-token verify: the heads then run although a draft would not pay against 1 row."""
    from types import SimpleNamespace

    from backend.decode_plan import SPLIT_KV_FROM_POS
    from backend.spec.draft_plan import DepthCounts
    from backend.spec.speculator import Speculator

    heads = heads_from_state_dict(fd_state(n_heads=2))
    costs = ({1: 20.0, 2: 30.0, 3: 40.0}, {1: 20.0, 2: 30.0})
    spec = Speculator(heads, chain(2), costs, lookup=False)
    spec.judged["medusa"] = DepthCounts([100, 100], [40, 10])  # E(1) = 1.4 for 30 ms < 1 token in 20 ms
    early, late = SimpleNamespace(n_past=SPLIT_KV_FROM_POS - 1), SimpleNamespace(n_past=SPLIT_KV_FROM_POS)
    spec.companion_cells = 4096
    assert spec.lone_plain_rows([early]) == 1 and spec.lone_plain_rows([late]) == 2
    assert spec.lone_plain_rows([late, late]) == 1  # several sequences share a decode: no companion
    assert spec.drafting(1, 1)[0] in (0, 2)  # 0, or all heads on a judging step
    assert spec.drafting(1, 2) == (2, True)  # one guess pays now; one more depth keeps being judged
    spec.companion_cells = 0  # EXACTNESS=fast: no companion rows
    assert spec.lone_plain_rows([late]) == 1
