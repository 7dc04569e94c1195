"""Constrained decoding with llguidance: grammars compiled once, one matcher per sequence, token masks.

The mask is applied to a row's logits before the request's sampler chain (bias, penalties,
temperature, top-p, seed), so every sampling feature works under a grammar, and greedy picks the
most likely allowed token. Why llguidance and not xgrammar: README, "Structured outputs".

Compilation happens where requests are prepared (the HTTP thread pool), never on the engine thread;
compiled grammars are kept in a bounded LRU keyed by their exact text and copied per sequence.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections import OrderedDict

import llguidance
import numpy as np
from llguidance.llamacpp import lltokenizer_from_vocab

from backend.llama_model import LlamaModel
from common.protocol import Grammar
from common.tool_format import ITEM_SEPARATOR, KEY_SEPARATOR

# JSON with one separator style and no free whitespace: a model cannot spin in whitespace, and the
# layout is the one the tool-call reader expects. A schema's own "x-guidance" options override it.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR}


class GrammarError(ValueError):
    """A grammar that cannot be compiled (invalid, or uses something llguidance does not support)."""


class GrammarCompiler:
    """Owns the model's llguidance tokenizer and the compiled-grammar cache (thread-safe)."""

    def __init__(self, model: LlamaModel, capacity: int = 64):
        self.model = model
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiles = 0
        self.hits = 0
        self.compile_seconds = 0.0

    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about a second for a 262k vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                m = self.model
                end = [t for t in range(m.n_vocab) if m.is_eog(t)] or [m.eos]
                with warnings.catch_warnings():  # the adapter calls a deprecated alias once per token
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = lltokenizer_from_vocab(m.vocab, eos_token=end)
            return self._tokenizer

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher for `grammar` (compiled on first sight). Raises GrammarError."""
        text = grammar_text(grammar)
        with self._lock:
            pristine = self._compiled.get(text)
            if pristine is not None:
                self._compiled.move_to_end(text)
                self.hits += 1
        if pristine is None:
            tokenizer = self.tokenizer()
            t0 = time.perf_counter()
            pristine = llguidance.LLMatcher(tokenizer, text, log_level=0)
            if pristine.is_error():
                raise GrammarError(pristine.get_error())
            with self._lock:
                self.compile_seconds += time.perf_counter() - t0
                self.compiles += 1
                self._compiled[text] = pristine
                while len(self._compiled) > self.capacity:
                    self._compiled.popitem(last=False)
        return pristine.deep_copy()


def grammar_text(grammar: Grammar) -> str:
    """llguidance's grammar text for a protocol Grammar. Raises GrammarError."""
    try:
        if grammar.type == "json_schema":
            if not isinstance(grammar.value, dict):
                raise GrammarError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(grammar.value), defaults=JSON_DEFAULTS)
        if not isinstance(grammar.value, str):
            raise GrammarError(f"a {grammar.type} grammar must be a string")
        if grammar.type == "lark":
            return llguidance.LLMatcher.grammar_from_lark(grammar.value)
        return llguidance.LLMatcher.grammar_from_regex(grammar.value)
    except ValueError as e:
        raise GrammarError(str(e)) from e


class Constraint:
    """One sequence's grammar state: masks its logits, follows the tokens it takes, proposes the
    tokens the grammar forces."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def apply(self, logits: np.ndarray) -> None:
        """Set every token the grammar forbids next to -inf, in place."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        apply_mask(logits, self._mask)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(self.matcher.get_error() or f"token {token} is not allowed here")

    @property
    def done(self) -> bool:
        """Nothing but the end may follow: the constrained text is complete."""
        return self.matcher.is_stopped()

    def forced(self, limit: int) -> list[int]:
        """Tokens the grammar allows as the only continuation (at most `limit`)."""
        return self.matcher.compute_ff_tokens()[:limit] if limit > 0 else []

    def allowed_prefix(self, draft: list[int]) -> list[int]:
        """`draft` up to (not including) the first token the grammar forbids."""
        return draft[: self.matcher.validate_tokens(draft)] if draft else []


def apply_mask(logits: np.ndarray, mask: np.ndarray) -> None:
    """logits[i] = -inf wherever bit i of `mask` (llguidance's bitmask: 32 tokens per int32 word,
    lowest bit first) is 0."""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little", count=logits.shape[0]).view(bool)
    np.copyto(logits, -np.inf, where=~allowed)
