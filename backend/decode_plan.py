"""How single-token decodes are laid out in llama_decode calls so that a sequence's logits never
depend on what else runs: a pure function of sequence ids and positions, tested without a model.

Why (read from llama.cpp's CPU flash attention, ggml-cpu/ops.cpp, and measured: tests/test_engine.py
and README, "The engine"): llama.cpp puts a run of consecutive sequence ids in one ubatch, one KV
stream each, and its KV view spans max(256, used cells rounded up to 256) cells. Flash attention then
takes one of three paths:
- one query row of one stream with a view of >= 512 cells: the KV is split across threads and the
  partial softmaxes are merged afterwards ("split-KV");
- 64 or more query rows of a stream (prompt chunks): tiles of queries and cells;
- everything else (several streams, or 2..63 rows of one stream): each row walks its cells in order.
The paths round differently: a token at position >= 256 decoded alone gets logits about 1 apart
(0.8-1.4 measured, `python -m bench.decode_paths`) from the same token decoded next to another
sequence or under a Medusa draft. So every generated token takes the per-row path: a sequence that
would form a one-token ubatch of its own past position 255 gets a throwaway companion row (its next
position, dropped right after the decode).
That next position always has a cell: a request ends when its last token reaches the context's
last position, and that token is never decoded.

Prompt chunks run alone on a fixed schedule and Medusa verifies 2..63 rows: both already fixed.
"""

from __future__ import annotations

# Position from which a lone single-token ubatch gets a KV view of >= 512 cells (split-KV path).
SPLIT_KV_FROM_POS = 256
# Query rows per stream from which flash attention tiles; a verify decode must stay below it.
TILED_FROM_ROWS = 64


def needs_companion(pos: int, n_cells: int) -> bool:
    """A single row of one sequence at `pos`, alone in its ubatch: would it take the split-KV path
    (and is there a cell after it; n_cells 0 turns companions off)?"""
    return pos >= SPLIT_KV_FROM_POS and pos + 1 < n_cells


def companion_rows(tokens: list[tuple[int, int]], n_cells: int) -> list[int]:
    """Which of the single-token decodes need a companion row. tokens: (sequence id, position) of
    each sequence's next token, sorted by sequence id; n_cells: KV cells per sequence."""
    ids = [seq for seq, _ in tokens]
    out = []
    for k, (seq, pos) in enumerate(tokens):
        in_run = (k > 0 and ids[k - 1] == seq - 1) or (k + 1 < len(ids) and ids[k + 1] == seq + 1)
        if not in_run and needs_companion(pos, n_cells):
            out.append(k)
    return out
