"""What the engine asks of Medusa: a draft path per sequence, when to speculate, and the figures.

The engine verifies a sequence's draft in that sequence's own llama_decode (root + draft tokens), so
the logits of every token are exactly those of plain decoding; the speculator decides how long the
draft is and under how many concurrent streams speculation still pays (from the tuning command).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from backend.medusa.heads import MedusaHeads
from backend.medusa.planning import plan
from backend.medusa.tree import Choices, candidates, path_ranks, validate

log = logging.getLogger("backend.medusa")


@dataclass
class MedusaStats:
    steps: int = 0  # speculative decodes
    tokens: int = 0  # tokens those decodes emitted (accepted + 1 each)
    drafted: int = 0  # draft tokens those decodes verified
    proposed: list[int] = field(default_factory=list)  # per depth: drafts judged there
    accepted: list[int] = field(default_factory=list)  # per depth: accepted there
    typical_accepted: int = 0  # draft tokens taken by typical acceptance instead of sampling

    def as_dict(self) -> dict:
        return {
            "speculative_steps": self.steps,
            "mean_tokens_per_step": round(self.tokens / self.steps, 4) if self.steps else None,
            "per_head_acceptance": [round(a / p, 4) if p else None for a, p in zip(self.accepted, self.proposed)],
            "typical_accepted": self.typical_accepted,
        }


class Speculator:
    def __init__(
        self,
        heads: MedusaHeads,
        choices: Choices,
        max_streams: int = 1,
        acceptance: str = "lossless",
        typical_epsilon: float = 0.09,
        typical_alpha: float = 0.3,
        costs: tuple[dict[int, float], dict[int, float]] | None = None,
        tune_after: int = 128,
        fixed_max_streams: bool = False,
    ):
        """costs: this machine's (draft cost, batch cost) curves; with them the speculator tunes
        itself on the acceptance of its first `tune_after` speculative steps (the tuning command's
        plan, online), switching off if no draft pays."""
        validate(choices, heads.n_heads)
        # The heads' matmuls are small; OpenBLAS's own threads would spin on after each one and
        # steal the cores llama.cpp's threads decode on (measured: a 19 ms decode became 112 ms).
        threadpool_limits(1, user_api="blas")
        self.heads = heads
        self.choices = choices
        self.ranks = path_ranks(choices)
        self.top_k = max(self.ranks) + 1 if self.ranks else 1
        self.max_streams = max_streams
        self.typical = acceptance == "typical"
        self.typical_epsilon = typical_epsilon
        self.typical_alpha = typical_alpha
        self.stats = MedusaStats(proposed=[0] * len(self.ranks), accepted=[0] * len(self.ranks))
        self.costs = costs
        self.tune_after = tune_after
        self.fixed_max_streams = fixed_max_streams
        self.note = "tuning online" if costs else ""

    @property
    def on(self) -> bool:
        """Whether the server speculates at all (the one place that says so; /info reports it)."""
        return bool(self.ranks)

    def disable(self, reason: str) -> None:
        self.ranks, self.choices = [], []
        self.note = reason
        log.warning("medusa: %s", reason)

    def active_for(self, n_streams: int) -> bool:
        return self.on and n_streams <= self.max_streams

    def drafts(self, hidden: np.ndarray) -> list[list[int]]:
        """One draft path per row of hidden states [B, H]."""
        if not self.ranks:
            return [[] for _ in range(np.atleast_2d(hidden).shape[0])]
        props = self.heads.propose(hidden, self.top_k, n=len(self.ranks))  # only the heads the draft uses
        return [candidates(props[:, b, :], self.ranks) for b in range(props.shape[1])]

    def record(self, draft_len: int, accepted: int) -> None:
        st = self.stats
        st.steps += 1
        st.tokens += accepted + 1
        st.drafted += draft_len
        for d in range(min(draft_len, accepted + 1)):  # depth d is judged only if all before it passed
            st.proposed[d] += 1
            if d < accepted:
                st.accepted[d] += 1
        if self.costs and st.steps == self.tune_after:
            self._retune()
        if st.steps % 500 == 0:
            log.info("medusa: %s", st.as_dict())

    def _retune(self) -> None:
        acceptance = [a or 0.0 for a in self.stats.as_dict()["per_head_acceptance"]]
        result = plan(acceptance, *self.costs)
        if not result["enabled"]:
            self.disable(f"off after {self.stats.steps} steps: {result['reason']}")
            return
        self.choices = [tuple(c) for c in result["choices"]]
        self.ranks = path_ranks(self.choices)
        if not self.fixed_max_streams:
            self.max_streams = result["max_streams"]
        self.note = (
            f"tuned after {self.stats.steps} steps: draft of {len(self.ranks)}, up to {self.max_streams} streams, "
            f"expected {result['expected_speedup_one_stream']}x on one stream"
        )
        log.info("medusa: %s", self.note)
