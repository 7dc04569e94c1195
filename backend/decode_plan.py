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

Prompt chunks run alone on a fixed schedule and a verify decode has 2..63 rows: both already fixed.
Under EXACTNESS=fast no companion rows are added (the engine's `companions` flag).
"""

from __future__ import annotations

# Position from which a lone single-token ubatch gets a KV view of >= 512 cells (split-KV path).
SPLIT_KV_FROM_POS = 256
# Query rows per stream from which flash attention tiles; a verify decode stays below it
# (backend/spec/verify_rows.py).
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


# --- prompt chunks and what a prompt cache may reuse ---------------------------------------------
# Measured (tests/test_prompt_cache.py, README "The prompt cache"): a cell written by a prefill chunk
# of TILED_FROM_ROWS or more rows of one sequence holds the same numbers whatever the chunk's length
# or start (chunks of 64..400 rows on any boundaries give bit-identical logits), while cells of
# shorter chunks and of single-token decode steps differ with the row count. Call such cells
# "tiled". A cold prefill runs chunks of `chunk` rows from position 0, so every prompt cell is tiled
# except those of a last chunk shorter than TILED_FROM_ROWS.


def cold_chunks(n_prompt: int, chunk: int) -> list[int]:
    """The end of each prompt chunk of a cold prefill: the fixed schedule."""
    return list(range(chunk, n_prompt, chunk)) + [n_prompt]


def tiled_end(n_prompt: int, chunk: int) -> int:
    """How many leading cells of a cold prefill are tiled."""
    if chunk < TILED_FROM_ROWS:
        return 0
    last_start = (n_prompt - 1) // chunk * chunk
    return n_prompt if n_prompt - last_start >= TILED_FROM_ROWS else last_start


def tiled_chunks(start: int, end: int, chunk: int) -> tuple[int, list[int]]:
    """Chunks that compute cells [start, end) as tiled cells: near-equal chunks of at most `chunk`
    rows (2 x TILED_FROM_ROWS - 1 when `chunk` is smaller) and at least TILED_FROM_ROWS. Moves
    `start` back when fewer rows remain (recomputing tiled cells changes none of them). Returns
    (start, chunk ends); with end < TILED_FROM_ROWS the one chunk is short (not tiled)."""
    start = max(0, min(start, end - TILED_FROM_ROWS))
    n = end - start
    k = max(1, -(-n // chunk))
    if n // k < TILED_FROM_ROWS:
        k = max(1, n // TILED_FROM_ROWS)
    return start, [start + n * (i + 1) // k for i in range(k)]


def reuse_plan(n_prompt: int, cached: int, chunk: int) -> tuple[int, list[int]]:
    """Exact prompt reuse: given that the first `cached` prompt tokens' cells are kept and tiled,
    how many to reuse and the chunk ends that prefill the rest, so that every cell and the last
    row's logits come out exactly as a cold prefill computes them. Tiled cells are computed by
    chunks of >= TILED_FROM_ROWS rows; a short last chunk of the cold schedule is run as it is."""
    cold = cold_chunks(n_prompt, chunk)
    end = tiled_end(n_prompt, chunk)
    reuse = min(cached, end if end < n_prompt else n_prompt - 1)
    if reuse <= 0 or end == 0:
        return 0, cold
    if reuse == end:  # all tiled cells kept: only the cold schedule's short last chunk remains
        return reuse, [n_prompt]
    start, ends = tiled_chunks(reuse, end, chunk)
    if start == 0:
        return 0, cold
    return start, ends + ([n_prompt] if end < n_prompt else [])


def fast_plan(n_prompt: int, cached: int, chunk: int) -> tuple[int, list[int]]:
    """Inexact reuse (PROMPT_CACHE=fast): every kept cell, whatever computed it; the rest in chunks."""
    reuse = max(0, min(cached, n_prompt - 1))
    return reuse, list(range(reuse + chunk, n_prompt, chunk)) + [n_prompt]
