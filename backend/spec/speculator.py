"""Speculation: which drafts exist for each decoding sequence and which of them a step verifies.

Three sources draft the tokens after a sequence's last one:
- "medusa": Medusa's heads (heads.py, run where head_compute.py says), from the hidden state of the
  last decode;
- "lookup": prompt lookup (lookup.py), what followed the last n-gram earlier in the sequence;
- "forced": the tokens a grammar forces (fast-forward), followed by Medusa's guesses for the depths
  after them, cut at the first token the grammar forbids (as every draft of a constrained sequence).

Each step the plan (draft_plan.choose) picks, per sequence, the draft and length worth a
verify decode of their own, or none, from each source's live acceptance and this machine's measured
decode costs. Every draft offered is later judged against the tokens the sequence really produced,
verified or not, so each source's acceptance stays current while the plan does not use it.

The draft never changes the output: a verify decode of at most `max_rows` rows (verify_rows.py)
gives every row exactly the logits plain decoding gives, and each row's token is chosen as plain
decoding chooses it (verify.py, backend/engine.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from backend.decode_plan import needs_companion
from backend.spec.draft_plan import Choice, CostTable, DepthCounts, Option, blended, choose, judge, plain_tokens_per_ms
from backend.spec.lookup import NgramIndex
from backend.spec.head_compute import HeadCompute
from backend.spec.heads import MedusaHeads
from backend.spec.tree import Choices, path_ranks, validate
from backend.spec.verify_rows import UNMEASURED_ROWS

log = logging.getLogger("backend.spec.speculator")

SOURCES = ("medusa", "lookup", "forced")
FORCED_PRIOR = 0.95  # grammar-forced tokens: the model nearly always takes them (measured 225/232)
LOG_EVERY = 500  # verify steps between log lines of the figures
JUDGE_EVERY = 8  # steps between drafts of every depth when the plan would use fewer (or none)


@dataclass
class VerifyStats:
    """One source's verify decodes: how many, what they yielded, acceptance per depth among them."""

    steps: int = 0  # verify decodes
    tokens: int = 0  # tokens they emitted (accepted + 1 each)
    drafted: int = 0  # draft tokens they verified
    proposed: list[int] = field(default_factory=list)  # per depth: drafts judged there
    accepted: list[int] = field(default_factory=list)  # per depth: accepted there
    typical_accepted: int = 0  # draft tokens taken by typical acceptance instead of sampling

    def record(self, draft_len: int, accepted: int) -> None:
        self.steps += 1
        self.tokens += accepted + 1
        self.drafted += draft_len
        depths = min(draft_len, accepted + 1)  # depth d is judged only if all before it passed
        if depths > len(self.proposed):
            self.proposed += [0] * (depths - len(self.proposed))
            self.accepted += [0] * (depths - len(self.accepted))
        for d in range(depths):
            self.proposed[d] += 1
            self.accepted[d] += d < accepted

    def as_dict(self) -> dict:
        return {
            "speculative_steps": self.steps,
            "mean_tokens_per_step": round(self.tokens / self.steps, 4) if self.steps else None,
            "per_head_acceptance": [round(a / p, 4) if p else None for a, p in zip(self.accepted, self.proposed)],
            "typical_accepted": self.typical_accepted,
        }


@dataclass
class SequenceDrafts:
    """A sequence's own speculation state: its lookup index, the drafts offered and not yet judged,
    and its own acceptance record per source."""

    index: NgramIndex | None = None
    indexed: int = 0  # generated tokens already in the index
    pending: list[tuple[int, str, tuple[int, ...], int]] = field(default_factory=list)  # (at, source, draft, n-gram)
    own: dict[str, DepthCounts] = field(default_factory=dict)


class Speculator:
    def __init__(
        self,
        heads: MedusaHeads | None,
        choices: Choices,
        costs: tuple[dict[int, float], dict[int, float]],
        lookup: bool = True,
        max_streams: int | None = None,
        pinned: bool = False,
        acceptance: str = "lossless",
        typical_epsilon: float = 0.09,
        typical_alpha: float = 0.3,
        compute: HeadCompute | None = None,
        max_rows: int = UNMEASURED_ROWS,
    ):
        """heads/choices: Medusa's heads and draft path (None/[]: no Medusa); costs: this machine's
        (verify cost by rows, shared-step cost by sequences), in ms; lookup: prompt-lookup drafts;
        max_streams: verify only while at most this many sequences decode (None: the plan decides);
        pinned: verify every sequence's best draft whole (a fixed MEDUSA_TREE), never judge the cost;
        compute: where the heads run (head_compute.py; default numpy); max_rows: the most rows of a
        verify decode (verify_rows.py: measured at load under EXACTNESS=strict)."""
        if heads is not None:
            validate(choices, heads.n_heads)
            compute = compute or HeadCompute(heads)
            # The heads' matmuls are small; OpenBLAS's own threads would spin on after each one and
            # steal the cores llama.cpp's threads decode on (measured: a 19 ms decode became 112 ms).
            threadpool_limits(1, user_api="blas")
        self.heads = heads
        self.compute = compute
        self.max_rows = max_rows
        self.max_draft = max_rows - 1
        self.choices = list(choices) if heads is not None else []
        self.ranks = path_ranks(self.choices) if heads is not None else []
        self.lookup = lookup
        self.max_streams = max_streams
        self.pinned = pinned
        self.typical = acceptance == "typical"
        self.typical_epsilon = typical_epsilon
        self.typical_alpha = typical_alpha
        self.chain = CostTable(costs[0])
        self.batch = CostTable(costs[1])
        # Depth counters exist from the start (metrics name every depth a draft may reach).
        depths = {"medusa": len(self.ranks), "lookup": self.max_draft, "forced": self.max_draft}
        self.verified = {s: VerifyStats(proposed=[0] * depths[s], accepted=[0] * depths[s]) for s in SOURCES}
        self.judged = {s: DepthCounts() for s in SOURCES}  # every draft offered, judged afterwards
        self.lookup_by_ngram: dict[int, DepthCounts] = {}
        self.decisions = {"verify": 0, "plain": 0}  # per sequence and step
        # KV cells per sequence where a lone sequence past position 255 decodes with a companion row
        # (the engine sets it: 0 under EXACTNESS=fast or on recurrent models, which take none).
        self.companion_cells = 0
        self._drafting_step = 0
        self.note = "planned per step" if not pinned else "pinned: every draft verified whole"
        self.off_reason = ""

    # --- what is on -----------------------------------------------------------------------------
    @property
    def stats(self) -> VerifyStats:
        """Medusa's verify figures (MedusaReport, metrics, tests)."""
        return self.verified["medusa"]

    @property
    def on(self) -> bool:
        """Whether Medusa's heads draft (/info's `medusa`)."""
        return bool(self.ranks)

    @property
    def active(self) -> bool:
        """Whether any source drafts for unconstrained text."""
        return self.on or self.lookup

    def disable(self, reason: str) -> None:
        """Speculation off for good (a memory that cannot drop a rejected draft)."""
        self.ranks, self.choices, self.lookup = [], [], False
        self.note = self.off_reason = reason
        log.warning("speculation: %s", reason)

    def drafts(self, hidden: np.ndarray, last_tokens: list[int], depth: int | None = None) -> list[list[int]]:
        """Medusa's draft per row of hidden states [B, H] (its first `depth` guesses); last_tokens: the
        token each row chose."""
        if self.heads is None or not self.ranks:
            return [[] for _ in last_tokens]
        return self.compute.draft(hidden, last_tokens, self.ranks[:depth])

    def lone_plain_rows(self, seqs: list) -> int:
        """Rows the plain decode of these sequences' next tokens takes per sequence: 2 for one
        sequence that needs a companion row (backend/decode_plan.py), else 1."""
        return 2 if self.companion_cells and len(seqs) == 1 and needs_companion(seqs[0].n_past, self.companion_cells) else 1

    def drafting(self, n_streams: int, lone_plain_rows: int = 1) -> tuple[int, bool]:
        """How deep Medusa drafts this step while n_streams decode, and whether for every sequence.
        The heads cost ~0.3 ms a depth for one sequence and ~0.7 ms for four (memory-bound matmuls)
        against a 20-30 ms decode, so they run only as deep as a draft could pay now (from the
        server-wide acceptance and the cost tables), plus one depth so that the next keeps being
        judged. Where no draft can pay (a small model under load) they run every JUDGE_EVERY-th step
        only, for one sequence, all heads deep: the acceptance figures stay current at ~2% of the cost."""
        if not self.ranks:
            return 0, False
        self._drafting_step += 1
        k = len(self.ranks)
        if self.pinned:
            return k, True
        acc = tuple(blended(None, self.judged["medusa"], d) for d in range(k))
        plain_rate = plain_tokens_per_ms(n_streams, self.chain, self.batch, lone_plain_rows)
        gain, length = Option("medusa", tuple(range(k)), acc).best_length(plain_rate, self.chain)
        judge_now = self._drafting_step % JUDGE_EVERY == 0
        if gain <= 0:
            return (k, False) if judge_now else (0, False)
        return (k if judge_now else min(k, length + 1)), True

    # --- the plan -------------------------------------------------------------------------------
    def plan(self, seqs: list, limit: int, fast_forward: bool) -> list[Choice | None]:
        """Per decoding sequence (sorted by id): the draft it verifies this step, or None. First judges
        what earlier drafts of these sequences would have yielded, then offers and records new ones."""
        options = []
        for seq in seqs:
            self._judge(seq)
            options.append(self._options(seq, limit, fast_forward))
        if self.max_streams is not None and len(seqs) > self.max_streams:  # MEDUSA_MAX_STREAMS
            chosen: list[Choice | None] = [None] * len(seqs)
        else:
            chosen = choose(options, self.chain, self.batch, pinned=self.pinned, lone_plain_rows=self.lone_plain_rows(seqs))
        verifying = sum(c is not None for c in chosen)
        self.decisions["verify"] += verifying
        self.decisions["plain"] += len(seqs) - verifying
        return chosen

    def _options(self, seq, limit: int, fast_forward: bool) -> list[Option]:
        st: SequenceDrafts = seq.drafts
        at = seq.generated
        out = []
        medusa = list(seq.draft[:limit]) if self.ranks else []
        forced = seq.constraint.forced(limit) if seq.constraint is not None and fast_forward else []
        if forced:
            draft = seq.constraint.allowed_prefix(forced + medusa[len(forced):])[:limit]
            acc = [blended(None, self.judged["forced"], d, FORCED_PRIOR) if d < len(forced)
                   else blended(st.own.get("medusa"), self.judged["medusa"], d) for d in range(len(draft))]
            out.append(Option("forced", tuple(draft), tuple(acc)))
            st.pending.append((at, "forced", tuple(forced), 0))
            return out  # the grammar decides these tokens: nothing else can beat them
        if medusa:
            draft = seq.constraint.allowed_prefix(medusa) if seq.constraint is not None else medusa
            if draft:
                acc = [blended(st.own.get("medusa"), self.judged["medusa"], d) for d in range(len(draft))]
                out.append(Option("medusa", tuple(draft), tuple(acc)))
            st.pending.append((at, "medusa", tuple(medusa), 0))
        if self.lookup:
            if st.index is None:
                st.index = NgramIndex(seq.request.tokens)
            st.index.extend(seq.tokens[st.indexed:])
            st.indexed = len(seq.tokens)
            found, n = st.index.propose(limit)
            if found:
                draft = seq.constraint.allowed_prefix(found) if seq.constraint is not None else found
                prior = self.lookup_by_ngram.get(n) or self.judged["lookup"]
                if draft:
                    acc = [blended(st.own.get("lookup"), prior, d) for d in range(len(draft))]
                    out.append(Option("lookup", tuple(draft), tuple(acc)))
                st.pending.append((at, "lookup", tuple(found), n))
        return out

    def _judge(self, seq) -> None:
        st: SequenceDrafts = seq.drafts
        if not st.pending:
            return
        keep = []
        for at, source, draft, n in st.pending:
            result = judge(draft, seq.tokens[at : at + len(draft)])
            if result is None:
                keep.append((at, source, draft, n))
                continue
            st.own.setdefault(source, DepthCounts()).add(*result)
            self.judged[source].add(*result)
            if source == "lookup":
                self.lookup_by_ngram.setdefault(n, DepthCounts()).add(*result)
        st.pending = keep

    # --- what the engine reports back -----------------------------------------------------------
    def record(self, source: str, draft_len: int, accepted: int) -> None:
        """A verify decode of a `source` draft: its length and how much of it was accepted."""
        st = self.verified[source]
        st.record(draft_len, accepted)
        if st.steps % LOG_EVERY == 0:
            log.info("speculation (%s): %s", source, st.as_dict())

    def observe(self, kind: str, size: int, seconds: float) -> None:
        """A decode the engine ran: kind 'chain' (rows of one sequence) or 'batch' (sequences)."""
        (self.chain if kind == "chain" else self.batch).observe(size, seconds * 1000)

    def report(self) -> dict:
        return {
            "sources": {
                s: {"on": (self.on if s == "medusa" else self.lookup if s == "lookup" else True),
                    "verified": self.verified[s].as_dict(), "judged_acceptance": self.judged[s].as_list(),
                    "judged": list(self.judged[s].judged), "accepted": list(self.judged[s].accepted)}
                for s in SOURCES
            },
            "lookup_acceptance_by_ngram": {str(n): c.as_list() for n, c in sorted(self.lookup_by_ngram.items())},
            "verify_cost_ms": self.chain.as_dict(),
            "step_cost_ms": self.batch.as_dict(),
            "decisions": dict(self.decisions),
            "max_streams": self.max_streams,
            "verify_max_rows": self.max_rows,
            "heads": self.compute.report() if self.compute is not None else None,
            "note": self.note,
        }
