"""A request and its sequences (one per choice): everything that is per-request state.

A `Sequence` owns its sampler, its grammar state, its text stream (UTF-8 and stop strings), its
limits, its logprob setting and its position, and turns each chosen token into protocol events. A `Request` holds its n
sequences, the prompt and how far it is prefilled, and the sink its events go to.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from backend.grammar import Constraint
from backend.llama_model import LlamaModel
from backend.logprobs import token_logprob
from backend.prepare import PreparedRequest
from backend.sampling import Sampler
from backend.slots import Slot
from backend.spec.speculator import SequenceDrafts
from backend.text_stream import TextStream
from common.protocol import DeltaEvent, DoneEvent, FinishReason, TokenLogprob
from common.tool_reply import ReplyReader

Sink = Callable[[list], None]  # receives a list of protocol events; must be thread-safe


class Sequence:
    def __init__(self, request: "Request", index: int, slot: Slot, model: LlamaModel):
        prep = request.prep
        self.request = request
        self.index = index  # choice index
        self.slot = slot
        self.model = model
        self.sampler = Sampler(prep.sampling, model.n_vocab, seed_offset=index)
        self.constraint = Constraint(prep.grammar.deep_copy(), model.n_vocab) if prep.grammar is not None else None
        self.text = TextStream(prep.stop)
        # A tool reply (the API layer sends tools with the grammar of their reply format), read as the
        # API layer reads it: see _tool_reply_ends.
        self.tool_reply = ReplyReader() if prep.req.tools and prep.grammar is not None else None
        self._last_call_end = 0  # tokens generated when the reply's latest complete call closed
        self.max_tokens = prep.max_tokens
        self.n_ctx = model.n_ctx_per_seq
        self.top_logprobs = prep.req.logprobs  # None: no logprobs
        self.ignore_eos = prep.req.ignore_eos
        self.tokens: list[int] = []  # generated
        self.n_past = len(prep.tokens) - 1  # position of last_token: cells exist below it
        self.last_token = prep.tokens[-1]
        self.draft: list[int] = []  # Medusa's guesses for the tokens after last_token
        self.drafts = SequenceDrafts()  # the speculator's per-sequence state (lookup index, judgements)
        # Every decode that wrote a generated token's cell had at most the verify limit's rows, so
        # those cells are the ones one-by-one decoding writes (decode_plan.VEC; the prompt cache's).
        self.vec_cells = True
        self.finished = False
        self.finish_reason: FinishReason | None = None

    @property
    def seq_id(self) -> int:
        return self.slot.seq_id

    @property
    def generated(self) -> int:
        return len(self.tokens)

    def kept_tokens(self) -> list[int]:
        """The tokens whose cells this sequence's slot holds (the last chosen token has none yet)."""
        if not self.request.decoding:  # cancelled while prefilling: the cells written so far
            return list(self.slot.tokens)
        return (self.request.prep.tokens + self.tokens)[: self.n_past]

    def step(self, row: int, forced: int | None = None) -> list:
        """Choose the next token from output row `row` of the last decode (or take `forced`, recorded
        in the sampler's penalty history as if sampled) and add it: the events it produces. Raises
        GrammarError if the grammar cannot go on (the engine fails the request)."""
        logits = self.model.logits(row)
        if forced is not None:
            self.sampler.accept(forced)
            return self.take(forced, logits)
        raw = logits
        if self.constraint is not None:
            if self.top_logprobs is not None:
                raw = logits.copy()  # logprobs are the model's own, before the mask (as before bias)
            self.constraint.apply(logits)  # in place: the sampler chain reads these logits
        return self.take(self.sampler.sample(self.model.ctx, row, logits), raw)

    def take(self, token: int, logits: np.ndarray) -> list:
        """Add a chosen token (sampled from `logits`): the events it produces."""
        self.tokens.append(token)
        self.n_past += 1
        self.last_token = token
        if self.model.is_eog(token) and not self.ignore_eos:
            return self.finish("stop")
        if self.constraint is not None:
            self.constraint.consume(token)
        text, stopped = self.text.push(self.model.token_bytes(token))
        lp: list[TokenLogprob] | None = None
        if self.top_logprobs is not None:
            lp = [token_logprob(self.model, logits, token, self.top_logprobs)]
        events = [DeltaEvent(id=self.request.id, index=self.index, text=text, token_ids=[token], logprobs=lp)]
        if stopped:
            events += self.finish("stop", flush=False)
        elif self.constraint is not None and self.constraint.done:
            events += self.finish("stop")  # the grammar allows nothing but the end
        elif self.tool_reply is not None and self._tool_reply_ends(text):
            events += self.finish("stop")
        elif self.generated >= self.max_tokens or self.n_past >= self.n_ctx:
            events += self.finish("length")
        return events

    def _tool_reply_ends(self, text: str) -> bool:
        """Whether a tool reply ends here, though its grammar would go on: at its first call that
        repeats an earlier one (a small model given room repeats a call until max_tokens), and right
        after a call when the tokens left could not hold another as long as it (a call cut short is
        dropped by the API layer, and a reply ended at a call's boundary is a complete one)."""
        reply = self.tool_reply
        calls = len(reply.calls)
        reply.feed(text)
        if reply.duplicate:
            return True
        if len(reply.calls) == calls:
            return False
        cost, self._last_call_end = self.generated - self._last_call_end, self.generated
        return min(self.max_tokens - self.generated, self.n_ctx - self.n_past) < cost

    def finish(self, reason: FinishReason, flush: bool = True) -> list:
        events = []
        if flush and reason != "cancelled":
            tail = self.text.flush()
            if tail:
                events.append(DeltaEvent(id=self.request.id, index=self.index, text=tail, token_ids=[]))
        self.finished = True
        self.finish_reason = reason
        self.sampler.close()
        events.append(DoneEvent(id=self.request.id, index=self.index, finish_reason=reason, completion_tokens=self.generated,
                                stop_sequence=self.text.matched if reason == "stop" else None))
        return events


@dataclass
class Request:
    prep: PreparedRequest
    sink: Sink
    seqs: list[Sequence] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens whose cells exist (reused or prefilled)
    chunk_ends: list[int] = field(default_factory=list)  # prompt chunks still to prefill
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)  # when the engine received it (queue time)

    @property
    def id(self) -> str:
        return self.prep.req.id

    @property
    def tokens(self) -> list[int]:
        return self.prep.tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prep.tokens)

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finished for s in self.seqs)

    def bind(self, slots: list[Slot], model: LlamaModel, reuse: int, chunk_ends: list[int]) -> None:
        """The request got its slots: one sequence per choice, the first prefills."""
        self.seqs = [Sequence(self, i, slot, model) for i, slot in enumerate(slots)]
        self.prefilled = self.cached_tokens = reuse
        self.chunk_ends = list(chunk_ends)
