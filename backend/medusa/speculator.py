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
from backend.medusa.tree import Choices, candidates, path_ranks, validate

log = logging.getLogger("backend.medusa")


@dataclass
class MedusaStats:
    steps: int = 0  # speculative decodes
    tokens: int = 0  # tokens those decodes emitted (accepted + 1 each)
    proposed: list[int] = field(default_factory=list)  # per depth: drafts judged there
    accepted: list[int] = field(default_factory=list)  # per depth: accepted there

    def as_dict(self) -> dict:
        return {
            "speculative_steps": self.steps,
            "mean_tokens_per_step": round(self.tokens / self.steps, 4) if self.steps else None,
            "per_head_acceptance": [round(a / p, 4) if p else None for a, p in zip(self.accepted, self.proposed)],
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
    ):
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

    def active_for(self, n_streams: int) -> bool:
        return bool(self.ranks) and n_streams <= self.max_streams

    def drafts(self, hidden: np.ndarray) -> list[list[int]]:
        """One draft path per row of hidden states [B, H]."""
        props = self.heads.propose(hidden, self.top_k)  # [n_heads, B, top_k]
        return [candidates(props[:, b, :], self.ranks) for b in range(props.shape[1])]

    def record(self, draft_len: int, accepted: int) -> None:
        st = self.stats
        st.steps += 1
        st.tokens += accepted + 1
        for d in range(min(draft_len, accepted + 1)):  # depth d is judged only if all before it passed
            st.proposed[d] += 1
            if d < accepted:
                st.accepted[d] += 1
        if st.steps % 500 == 0:
            log.info("medusa: %s", st.as_dict())
