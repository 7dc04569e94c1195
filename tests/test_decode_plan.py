"""The layout of single-token decodes (backend/decode_plan.py), without a model."""

from __future__ import annotations

from backend.decode_plan import SPLIT_KV_FROM_POS, companion_rows, needs_companion

LONG = SPLIT_KV_FROM_POS  # the first position whose lone decode would take the split-KV path


def test_short_sequences_need_no_companion():
    assert companion_rows([(0, 10), (2, LONG - 1)], n_cells=1024) == []


def test_a_long_sequence_alone_in_its_run_gets_a_companion():
    # ids 0 and 2 are not consecutive: llama.cpp gives each its own ubatch.
    assert companion_rows([(0, LONG), (2, 900)], n_cells=1024) == [0, 1]
    assert companion_rows([(3, 700)], n_cells=1024) == [0]  # one sequence decoding alone


def test_consecutive_ids_share_a_ubatch_and_need_no_companion():
    assert companion_rows([(0, 900), (1, 5), (2, 600), (5, 400)], n_cells=1024) == [3]  # 5 is alone and long
    assert companion_rows([(6, 5), (7, 900)], n_cells=1024) == []


def test_a_companion_needs_a_free_cell_after_the_token():
    assert needs_companion(LONG, 1024) and needs_companion(1022, 1024)
    assert not needs_companion(1023, 1024) and not needs_companion(LONG - 1, 1024)
    assert not needs_companion(700, 0)  # 0 cells: companions off (recurrent memory)
