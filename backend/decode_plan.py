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

from bisect import bisect_right
from dataclasses import dataclass

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
# or start (chunks of 64..400 rows on any boundaries give bit-identical logits). Call such cells
# "tiled". Cells of shorter chunks and of decode steps hold other numbers, in two more classes of
# their own (below). A cold prefill runs chunks of `chunk` rows from position 0, so every prompt
# cell is tiled except those of a last chunk shorter than TILED_FROM_ROWS.


def cold_chunks(n_prompt: int, chunk: int) -> list[int]:
    """The end of each prompt chunk of a cold prefill: the fixed schedule."""
    return list(range(chunk, n_prompt, chunk)) + [n_prompt]


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


def fast_plan(n_prompt: int, cached: int, chunk: int) -> tuple[int, list[int]]:
    """Inexact reuse (PROMPT_CACHE=fast): every kept cell, whatever computed it; the rest in chunks."""
    reuse = max(0, min(cached, n_prompt - 1))
    return reuse, list(range(reuse + chunk, n_prompt, chunk)) + [n_prompt]


# --- cell classes: exact reuse of any cell, not only tiled ones ----------------------------------
# Measured (tests/test_prompt_cache.py; at load, verify_rows.mixed_chunks_match): the numbers a cell holds depend
# on the row count of the one-sequence llama_decode that wrote it only through the kernels that count
# takes, and within each class not at all (whatever the chunking, the later logits are bit-identical):
# - VEC, 1..vec_rows rows (7 here): matrix-vector dot products and per-row attention, the cells that
#   decode steps and verify decodes write;
# - MIXED, vec_rows+1..63 rows: tiled matmuls, per-row attention;
# - TILED, >= TILED_FROM_ROWS rows: tiled matmuls and tiled attention.
# Cells of different classes differ (by ~1.4 in a later logit). So a cached cell is reusable for a
# request exactly when the request's own cold schedule writes a cell of the same class there.
NONE, VEC, MIXED, TILED = 0, 1, 2, 3


@dataclass(frozen=True)
class CellRules:
    """Which decodes write equal cells, as measured when the model loads (backend/spec/verify_rows.py).
    The default knows only tiled cells: the rule before classes were measured, and the one without."""

    vec_rows: int = 0  # decodes of 1..vec_rows rows write what one-by-one decoding writes (0: unknown)
    mixed: bool = False  # decodes of vec_rows+1..63 rows write equal cells whatever their length
    answers: bool = True  # chat prompts' answers in decode-sized chunks (PROMPT_CACHE_ANSWERS=reuse)

    def of(self, rows: int) -> int:
        """The class of the cells a one-sequence decode of `rows` rows writes."""
        if rows >= TILED_FROM_ROWS:
            return TILED
        if rows <= self.vec_rows:
            return VEC
        return MIXED if self.mixed else NONE

    @property
    def segments(self) -> bool:
        """Whether a chat prompt's earlier answers may be computed as decode-step cells (below)."""
        return self.vec_rows > 0 and self.mixed and self.answers


def canonical_ends(n_prompt: int, chunk: int, spans: list[tuple[int, int]] | None, rules: CellRules) -> list[int]:
    """A prompt's cold schedule: the end of each chunk. Without spans, chunks of `chunk` rows from 0
    (cold_chunks). A chat prompt's spans are the token ranges of its earlier answers: they run in
    chunks of rules.vec_rows rows, so their cells are the ones decoding them wrote, and the text
    between them (system, user messages, template) in chunks of `chunk` rows from each one's start.
    A conversation's next turn then finds every cell of its history as its cold schedule writes it
    and computes only its new message. The schedule depends on the request alone."""
    if not spans or not rules.segments:
        return cold_chunks(n_prompt, chunk)
    ends: list[int] = []
    pos = 0
    for start, end in sorted(spans):
        start, end = max(start, pos), min(end, n_prompt)
        if start >= end:
            continue
        if start > pos:
            ends += [pos + e for e in cold_chunks(start - pos, chunk)]
        ends += list(range(start + rules.vec_rows, end, rules.vec_rows)) + [end]
        pos = end
    if pos < n_prompt:
        ends += [pos + e for e in cold_chunks(n_prompt - pos, chunk)]
    return ends


def classes_of(ends: list[int], rules: CellRules) -> bytes:
    """The class of each cell a schedule writes (chunk ends from position 0)."""
    out = bytearray()
    start = 0
    for end in ends:
        out += bytes([rules.of(end - start)]) * (end - start)
        start = end
    return bytes(out)


def exact_plan(n_prompt: int, chunk: int, spans: list[tuple[int, int]] | None, rules: CellRules,
               shared: int, cached: bytes) -> tuple[int, list[int]]:
    """Exact prompt reuse: the first `shared` prompt tokens have cells of classes `cached`. How many
    to reuse and the chunk ends that compute the rest, so that every cell comes out of the class the
    cold schedule writes there (and so with its numbers), and the last row's logits too. A cold
    chunk entered part way is computed from where reuse stops, moved back over cells of its own
    class when fewer rows would change the class (recomputing a cell in its class changes nothing)."""
    ends = canonical_ends(n_prompt, chunk, spans, rules)
    want = classes_of(ends, rules)
    limit = min(shared, n_prompt - 1, len(cached))
    reuse = 0
    while reuse < limit and cached[reuse] != NONE and cached[reuse] == want[reuse]:
        reuse += 1
    if reuse == 0:
        return 0, ends
    k = bisect_right(ends, reuse)  # the cold chunk [ends[k-1], ends[k]) holds position `reuse`
    chunk_start, chunk_end = (ends[k - 1] if k else 0), ends[k]
    if reuse == chunk_start:
        return reuse, ends[k:]
    # Inside a cold chunk, want[reuse] is the class of cells before it, never NONE (those stop reuse
    # at the chunk's start).
    least = {VEC: 1, MIXED: rules.vec_rows + 1, TILED: TILED_FROM_ROWS}[want[reuse]]
    start = min(reuse, chunk_end - least)  # >= chunk_start: a cold chunk has rows of its own class
    return (start, ends[k:]) if start else (0, ends)
