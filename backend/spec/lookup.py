"""Prompt-lookup drafts: where the last few tokens occurred before, what followed them then.

RAG answers, summaries, code edits and JSON echoes copy spans of their prompt, and generated text
repeats itself; a drafter that matches the sequence's last n tokens (n from NGRAM_MAX down to
NGRAM_MIN) against everything before them (prompt and output) proposes the tokens that followed the
most recent earlier occurrence, as llama.cpp's ngram speculative types and vLLM's ngram proposer do.
It costs no model work; the verify decode decides what of it is kept, so output never depends on it.

An index per sequence maps each n-gram to where it last ended; it is extended as tokens come, so a
proposal costs a few dictionary lookups. The prompt is indexed INDEX_BUDGET positions per proposal
(about 1 ms), so that a long prompt never stalls the engine's step for the other streams: its
earliest positions are matched first, its latest a few steps later.
"""

from __future__ import annotations

NGRAM_MIN = 1
NGRAM_MAX = 4
INDEX_BUDGET = 512  # positions indexed per proposal


class NgramIndex:
    def __init__(self, tokens: list[int] | None = None, ngram_min: int = NGRAM_MIN, ngram_max: int = NGRAM_MAX):
        self.tokens: list[int] = list(tokens or [])
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> position just after its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _last

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _catch_up(self, budget: int) -> None:
        # Index the n-grams ending at every position but the last: the latest one is the sequence's own
        # suffix, which must match an earlier occurrence, not itself.
        toks, last = self.tokens, self._last
        stop = min(len(toks) - 1, self._indexed + budget)
        for end in range(self._indexed, stop):
            for n in range(self.ngram_min, self.ngram_max + 1):
                if end + 1 >= n:
                    last[tuple(toks[end + 1 - n : end + 1])] = end + 1
        self._indexed = max(self._indexed, stop)

    def propose(self, limit: int, budget: int = INDEX_BUDGET) -> tuple[list[int], int]:
        """(draft of up to `limit` tokens, length of the matched n-gram); ([], 0) when nothing matches.
        Indexes up to `budget` more positions first."""
        self._catch_up(budget)
        toks = self.tokens
        for n in range(min(self.ngram_max, len(toks)), self.ngram_min - 1, -1):
            start = self._last.get(tuple(toks[len(toks) - n :]))
            if start is not None:
                return toks[start : start + limit], n
        return [], 0
