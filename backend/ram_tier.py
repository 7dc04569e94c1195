"""The prompt cache's host-memory tier: saved sequence states (llama_state_seq_get_data bytes) keyed by
the tokens whose cells they hold, bounded in bytes, least recently used out first.

Why it pays (measured on the default model, `python -m bench.multiturn` and README): saving 1.8k
tokens' cells takes ~20 ms and restoring them ~3 ms, against ~2.8 s to prefill them again, so a
restore pays whenever it saves even one prompt chunk. Pure bookkeeping: the slot manager does the
llama.cpp calls.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass
class SavedState:
    tokens: np.ndarray  # int32: the tokens whose cells `state` holds, from position 0
    state: np.ndarray  # uint8
    classes: bytes = b""  # exact mode: the class of each cell (backend/decode_plan.py)


class RamTier:
    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self._entries: OrderedDict[int, SavedState] = OrderedDict()  # oldest use first
        self._next_key = 0
        self.bytes = 0
        self.saves = 0
        self.restores = 0
        self.lookups = 0  # admissions that consulted the tier

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: np.ndarray, longest: int = 1 << 62) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with the prompt, among entries of at most `longest`
        tokens: (key, shared tokens)."""
        best_key, best_len = None, 0
        for key, e in self._entries.items():
            if len(e.tokens) > longest:
                continue
            n = common_prefix(e.tokens, prompt)
            if n > best_len:
                best_key, best_len = key, n
        return best_key, best_len

    def covers(self, tokens: np.ndarray) -> bool:
        """Some entry already holds these tokens (or more after them)."""
        return any(len(e.tokens) >= len(tokens) and common_prefix(e.tokens, tokens) == len(tokens) for e in self._entries.values())

    def peek(self, key: int) -> SavedState:
        """An entry, without counting a use."""
        return self._entries[key]

    def get(self, key: int) -> SavedState:
        self._entries.move_to_end(key)
        self.restores += 1
        return self._entries[key]

    def put(self, tokens: np.ndarray, state: np.ndarray, classes: bytes = b"") -> bool:
        """Keep a state, dropping entries it extends and the least recently used ones past capacity."""
        if state.nbytes > self.capacity or self.covers(tokens):
            return False
        for key in [k for k, e in self._entries.items() if len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self._drop(key)
        while self.bytes + state.nbytes > self.capacity:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = SavedState(tokens, state, classes)
        self._next_key += 1
        self.bytes += state.nbytes
        self.saves += 1
        return True

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).state.nbytes
