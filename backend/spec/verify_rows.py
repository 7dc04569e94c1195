"""How many rows one verify decode may have: a property of the backend, measured at load.

A verify decode computes a sequence's last token and its draft in one llama_decode. Speculation is
exact only if every row of it gets, to the bit, the logits that decoding the same tokens one by one
gives. Whether it does depends on the kernels llama.cpp picks for that row count, which differ by
device and build:
- on this project's CPU (gemma-3-270m Q4_K_M, 2 threads) every row of a decode of 2..7 rows
  matches; from 8 rows the matmuls round differently and a later row is off by 0.2 (8-11 rows), 0.28
  (12-23), up to 1.2 (32) in a logit, enough to change what a seeded sampler draws;
- on CUDA, matrix-vector kernels serve a few rows and tiled matmuls more, with other rounding.
So under EXACTNESS=strict the limit is measured when the model loads (`measure`): the reference is
greedy decoding one row at a time, then decodes of 2, 3, ... rows of the same tokens are compared
with it, and the limit is the last row count before the first mismatch. Under EXACTNESS=fast any row
count up to MAX_ROWS is allowed, as llama-server drafts whatever its settings say.

The probe runs at one position (after CALIBRATION_TEXT, below the 256 cells at which the split-KV
path starts: backend/decode_plan.py), the position the cost measurement uses. A second probe
(`mixed_chunks_match`) checks that prompt chunks between that limit and 64 rows write equal cells
whatever their length, which the exact prompt cache's cell classes rest on (decode_plan.CellRules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from backend.decode_plan import TILED_FROM_ROWS, CellRules
from backend.llama_model import LlamaModel
from backend.spec.costs import CALIBRATION_TEXT

log = logging.getLogger("backend.spec")

# The most rows of a verify decode in any mode (1 + 32 draft tokens): below flash attention's tiling
# from TILED_FROM_ROWS query rows on the CPU, and past what pays on any device measured (an H200's
# 16-row decode costs 1.9x one row, its 32-row one 2.4x).
MAX_ROWS = min(33, TILED_FROM_ROWS - 1)
# Without a measurement (a memory that cannot drop a draft's cells, so no probe can run): the CPU's.
UNMEASURED_ROWS = 7


@dataclass(frozen=True)
class VerifyLimit:
    rows: int  # most rows (last token + draft) of one verify decode
    exactness: str  # "strict" or "fast"
    probed: dict[int, bool] = field(default_factory=dict)  # row count -> every row exact (strict only)
    note: str = ""
    # A token decoded beside another sequence's gets the logits it gets alone (None: not probed). The
    # engine relies on it for output independent of load; measured 0 difference on the CPU.
    shared_exact: bool | None = None
    # Prompt chunks of rows+1..63 rows write equal cells whatever their length (None: not probed).
    # With it, the exact prompt cache reuses a conversation's answers as decoded (decode_plan.CellRules).
    mixed_exact: bool | None = None

    @property
    def max_draft(self) -> int:
        return self.rows - 1

    @property
    def cell_rules(self) -> CellRules:
        """Which cells the exact prompt cache may take as equal: measured classes under strict, else
        tiled cells only (fast mode reuses every cell anyway)."""
        if self.exactness != "strict" or not self.probed:
            return CellRules()
        return CellRules(vec_rows=self.rows, mixed=bool(self.mixed_exact))

    def as_dict(self) -> dict:
        return {"verify_max_rows": self.rows, "exactness": self.exactness,
                "exact_by_rows": {str(k): v for k, v in sorted(self.probed.items())},
                "shared_step_exact": self.shared_exact, "mixed_chunks_exact": self.mixed_exact, "note": self.note}


def largest_exact(probed: dict[int, bool], cap: int = MAX_ROWS) -> int:
    """1 + the run of exact row counts from 2 upwards (a plan may pick any length up to the limit, so
    one mismatch ends it, whatever larger counts did)."""
    rows = 1
    while rows < cap and probed.get(rows + 1):
        rows += 1
    return rows


def rows_match(reference: list[np.ndarray], rows: list[np.ndarray]) -> bool:
    """Every row's logits bit-identical to the reference row's."""
    return len(reference) == len(rows) and all(np.array_equal(a, b) for a, b in zip(reference, rows))


def measure(model: LlamaModel, cap: int = MAX_ROWS, seq_id: int = 0) -> tuple[dict[int, bool], bool | None]:
    """Probe row counts 2..cap on sequence `seq_id`, stopping at the first that is not exact; and
    whether its first token decoded beside sequence seq_id + 1 (when there is one) matches."""
    prompt = model.tokenize(CALIBRATION_TEXT, True)
    pos = len(prompt)
    first = int(np.argmax(model.prefill(prompt, seq_id)))

    def decode(tokens: list[int], at: int) -> list[np.ndarray]:
        model.batch_clear()
        for j, t in enumerate(tokens):
            model.batch_add(t, at + j, seq_id, True)
        if model.decode() != 0:
            raise RuntimeError("llama_decode failed while probing verify decodes")
        return [model.logits(j).copy() for j in range(len(tokens))]

    # The reference: greedy decoding, one row per decode.
    tokens, reference = [first], []
    for j in range(cap):
        reference.append(decode([tokens[j]], pos + j)[0])
        tokens.append(int(np.argmax(reference[-1])))
    probed: dict[int, bool] = {}
    for k in range(2, cap + 1):
        model.seq_rm(seq_id, pos, -1)
        probed[k] = rows_match(reference[:k], decode(tokens[:k], pos))
        if not probed[k]:
            break
    shared = None
    if model.n_parallel > seq_id + 1:
        other = seq_id + 1
        model.prefill(prompt[:-1], other)
        model.seq_rm(seq_id, pos, -1)
        model.batch_clear()
        model.batch_add(tokens[0], pos, seq_id, True)
        model.batch_add(prompt[-1], pos - 1, other, True)
        if model.decode() != 0:
            raise RuntimeError("llama_decode failed while probing a shared step")
        shared = bool(np.array_equal(model.logits(0), reference[0]))
        model.seq_rm(other)
    model.seq_rm(seq_id)
    return probed, shared


def mixed_chunks_match(model: LlamaModel, vec_rows: int, rows: int = 48, seq_id: int = 0) -> bool:
    """Whether a prompt's last `rows` tokens written as one chunk, as a chunk of vec_rows+1 rows and
    one of the rest, and as two halves leave the next token bit-identical logits (the MIXED class of
    backend/decode_plan.py: chunks of vec_rows+1..63 rows write equal cells)."""
    prompt = model.tokenize(" ".join([CALIBRATION_TEXT] * 4), True)
    n = len(prompt)
    head = n - rows
    if head < 1 or vec_rows + 1 >= rows // 2:
        return False
    model.prefill(prompt[:head], seq_id)
    out = []
    for ends in ([n], [head + vec_rows + 1, n], [head + rows // 2, n]):
        model.seq_rm(seq_id, head, -1)
        start = head
        for end in ends:
            model.batch_clear()
            for p in range(start, end):
                last = model.batch_add(prompt[p], p, seq_id, p == end - 1)
            if model.decode() != 0:
                raise RuntimeError("llama_decode failed while probing prompt chunks")
            start = end
        token = int(np.argmax(model.logits(last)))
        model.batch_clear()
        model.batch_add(token, n, seq_id, True)
        if model.decode() != 0:
            raise RuntimeError("llama_decode failed while probing prompt chunks")
        out.append(model.logits(0).copy())
    model.seq_rm(seq_id)
    return all(np.array_equal(out[0], o) for o in out[1:])


def verify_limit(model: LlamaModel, exactness: str) -> VerifyLimit:
    """The verify limit for this model and EXACTNESS setting, measured now under strict."""
    if exactness == "fast":
        return VerifyLimit(MAX_ROWS, "fast", note="EXACTNESS=fast: any row count up to %d" % MAX_ROWS)
    if not model.attention_only:
        return VerifyLimit(UNMEASURED_ROWS, "strict", note="not measured: this memory cannot drop a probe's cells")
    probed, shared = measure(model)
    rows = largest_exact(probed)
    mixed = mixed_chunks_match(model, rows)
    limit = VerifyLimit(rows, "strict", probed, note=f"measured: decodes of up to {rows} rows match one-by-one decoding",
                        shared_exact=shared, mixed_exact=mixed)
    log.info("verify decodes: up to %d rows exact (probed %s); prompt chunks of %d..%d rows equal: %s",
             rows, probed, rows + 1, TILED_FROM_ROWS - 1, mixed)
    if shared is False:
        log.warning("a token decoded beside another sequence gets other logits than alone on this backend: "
                    "greedy output may depend on load here")
    return limit
