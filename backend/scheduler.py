"""Admits requests to slots and composes each engine step: which sequences decode one token, which
verify a Medusa draft, which prompt chunk runs, and, when there is nothing else, which idle chunk
re-prefills a finished conversation so its next turn hits the cache.

Why the step has separate decodes (and never mixes a prompt chunk with single tokens): llama.cpp's
CPU kernels give a token other logits when another sequence's multi-token chunk shares its ubatch,
so greedy output would depend on load. Single tokens of distinct sequences go in one decode in
sequence-id order (llama.cpp splits out-of-order ids into one ubatch each), a Medusa draft in its
sequence's own decode, a prompt chunk alone on its schedule (backend/decode_plan.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from backend.sequence import Request, Sequence
from backend.slots import Slot, SlotManager
from backend.spec.speculator import Speculator
from backend.spec.verify_rows import UNMEASURED_ROWS

PROMPT_LOGPROBS_CHUNK = 32  # every token of such a chunk is an output row of n_vocab floats


def forced_alone(seq: Sequence, n_decoding: int, limit: int, fast_forward: bool) -> list[int]:
    """Without a speculator: the grammar-forced tokens a sequence verifies, only while it decodes alone;
    measured (bench.structured, no Medusa), verifying forced runs in their own decodes while four
    streams decode cost 0.74x the aggregate of the shared decode."""
    if seq.constraint is None or not fast_forward or n_decoding != 1:
        return []
    return seq.constraint.forced(limit)


@dataclass
class StepPlan:
    # (sequence, draft, its source: "medusa", "lookup" or "forced"): each verified in its own decode
    speculative: list[tuple[Sequence, list[int], str]] = field(default_factory=list)
    plain: list[Sequence] = field(default_factory=list)  # one token each, one decode, sequence-id order
    prefill: tuple[Request, int, int] | None = None  # request, chunk start, chunk end
    idle: tuple[Slot, list[int], int, int] | None = None  # slot, its tokens, chunk start, chunk end

    @property
    def empty(self) -> bool:
        return not (self.speculative or self.plain or self.prefill or self.idle)


class Scheduler:
    def __init__(self, slots: SlotManager, prefill_chunk: int, fast_forward: bool = True,
                 max_draft: int = UNMEASURED_ROWS - 1):
        """max_draft: the longest draft a verify decode holds (backend/spec/verify_rows.py)."""
        self.slots = slots
        self.max_draft = max_draft
        self.prefill_chunk = prefill_chunk
        self.fast_forward = fast_forward
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def admit(self) -> list[Request]:
        """In arrival order, while the oldest waiting request finds its slots: those admitted."""
        admitted = []
        while self.waiting:
            req = self.waiting[0]
            logprobs = req.prep.req.prompt_logprobs
            got = self.slots.admit(
                req.tokens, req.prep.req.n, cacheable=not logprobs,
                chunk=PROMPT_LOGPROBS_CHUNK if logprobs else self.prefill_chunk, spans=req.prep.spans,
            )
            if got is None:
                break
            self.waiting.popleft()
            req.bind(got.slots, self.slots.model, got.reuse, got.ends)
            self.running.append(req)
            admitted.append(req)
        return admitted

    def plan(self, spec: Speculator | None, idle_ok: bool = True) -> StepPlan:
        """spec: the speculator that picks each sequence's draft (None: grammar-forced runs only, while
        one sequence decodes); idle_ok: whether an idle chunk may run if there is nothing else."""
        decoding = sorted((s for r in self.running if r.decoding for s in r.seqs if not s.finished), key=lambda s: s.seq_id)
        step = StepPlan()
        if spec is not None:
            chosen = [(c.draft, c.source) if c is not None else None
                      for c in spec.plan(decoding, self.max_draft, self.fast_forward)]
        else:
            chosen = [(f, "forced") if (f := forced_alone(s, len(decoding), self.max_draft, self.fast_forward)) else None
                      for s in decoding]
        for seq, pick in zip(decoding, chosen):
            if pick is not None:
                step.speculative.append((seq, list(pick[0]), pick[1]))
            else:
                step.plain.append(seq)
        req = next((r for r in self.running if not r.decoding), None)
        if req is not None:
            step.prefill = (req, req.prefilled, req.chunk_ends[0])
        elif not decoding and not self.waiting:
            step.idle = self.slots.idle_chunk(long_ok=idle_ok)
        return step

    def retire(self) -> list[Request]:
        """Drop finished requests from the running list; returns them."""
        done = [r for r in self.running if r.finished]
        self.running = [r for r in self.running if not r.finished]
        return done

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
