"""The engine thread: continuous batching over one llama.cpp context.

Each step builds ONE llama_batch with one token for every decoding sequence plus prompt chunks of
requests being prefilled, calls llama_decode once, samples, and hands the resulting events to each
request's sink. Requests join and leave between steps. Only this thread touches the context.

A request with n choices prefills its prompt once on its first sequence, then copies those cells to
the other choices' sequences (llama_memory_seq_cp) instead of prefilling n times.

With Medusa heads (backend/medusa), a sequence whose heads proposed a draft decodes its last token
plus the draft in its own llama_decode while few enough streams run; the target token at each row is
sampled exactly as plain decoding would, and the walk goes on while it matches the draft.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from backend.decode_plan import TILED_FROM_ROWS, companion_rows, needs_companion
from backend.llama_model import LlamaModel
from backend.medusa.speculator import Speculator
from backend.medusa.tree import typical_ok
from backend.prepare import PreparedRequest
from backend.sampling import Sampler, log_softmax_top
from backend.text_stream import TextStream
from common.protocol import (
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    PromptEvent,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger("backend.engine")

Sink = Callable[[list], None]  # receives a list of protocol events; must be thread-safe
PROMPT_LOGPROBS_CHUNK = 32  # every token of such a chunk is an output row of n_vocab floats


@dataclass
class _Seq:
    index: int  # choice index
    seq_id: int
    sampler: Sampler
    text: TextStream
    n_past: int = 0  # position of last_token
    last_token: int = -1
    generated: int = 0
    done: bool = False
    draft: list[int] = field(default_factory=list)  # Medusa's guesses for the tokens after last_token


@dataclass
class _Active:
    prep: PreparedRequest
    sink: Sink
    seqs: list[_Seq] = field(default_factory=list)
    prefilled: int = 0
    prompt_logprobs: list = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.prep.req.id

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prep.tokens)


@dataclass
class EngineStats:
    steps: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    decode_seconds: float = 0.0


class Engine:
    def __init__(self, model: LlamaModel, prefill_chunk: int = 256, speculator: Speculator | None = None):
        if speculator is not None and not model.embeddings:
            raise ValueError("Medusa needs a context with embeddings on")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.spec = speculator
        self.stats = EngineStats()
        self._commands: queue.Queue = queue.Queue()
        self._waiting: deque[_Active] = deque()
        self._running: list[_Active] = []
        self._free_seq_ids = list(range(model.n_parallel))
        self._outbox: dict[int, tuple[Sink, list]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stop = False

    # --- API for other threads ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    def submit(self, prep: PreparedRequest, sink: Sink) -> None:
        self._commands.put(("submit", _Active(prep, sink)))

    def cancel(self, ids: list[str]) -> None:
        self._commands.put(("cancel", set(ids)))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._take_commands(block=not (self._running or self._waiting))
            self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as e:  # never let one bad step kill the thread
                    log.exception("engine step failed")
                    for act in list(self._running):
                        self._fail(act, f"internal engine error: {e}")
            self._flush()
        for act in list(self._running) + list(self._waiting):
            self._fail(act, "the model server is shutting down")
        self._flush()

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "stop":
                self._stop = True
            elif kind == "submit":
                self._waiting.append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _cancel(self, ids: set[str]) -> None:
        for act in [a for a in self._waiting if a.id in ids]:
            self._waiting.remove(act)
            for i in range(act.prep.req.n):
                self._emit(act, DoneEvent(id=act.id, index=i, finish_reason="cancelled", completion_tokens=0))
        for act in [a for a in self._running if a.id in ids]:
            for seq in act.seqs:
                if not seq.done:
                    self._finish(act, seq, "cancelled")
            self._retire(act)

    def _admit(self) -> None:
        while self._waiting and len(self._free_seq_ids) >= self._waiting[0].prep.req.n:
            act = self._waiting.popleft()
            req = act.prep.req
            for i in range(req.n):
                params = act.prep.sampling
                act.seqs.append(
                    _Seq(
                        index=i,
                        seq_id=self._take_seq_id(),
                        sampler=Sampler(params, self.model.n_vocab, seed_offset=i),
                        text=TextStream(req.stop),
                    )
                )
            self._running.append(act)

    def _take_seq_id(self) -> int:
        # The lowest free id: llama.cpp batches only runs of consecutive sequence ids together
        # (measured on 4 streams: ids 0,1,2,3 29 ms a step, 0,2,5,7 77 ms), so keep ids packed.
        seq_id = min(self._free_seq_ids)
        self._free_seq_ids.remove(seq_id)
        return seq_id

    def _step(self) -> None:
        """One token for every decoding sequence, then one prompt chunk of the oldest prefilling
        request, each in its own llama_decode.

        Why two calls, not one mixed batch: llama.cpp's CPU kernels give a token slightly different
        logits when other sequences' multi-token chunks share its ubatch (tests/test_engine.py
        shows it), which would make greedy output depend on concurrency. A batch of single tokens
        of distinct sequences is invariant once no token past position 255 sits alone in its
        ubatch (backend/decode_plan.py lays that out), and so is a chunk that holds one sequence
        alone on a fixed schedule, so every request decodes exactly as it would alone."""
        m = self.model
        # In seq-id order: llama.cpp splits a batch whose ids are out of order into one ubatch per
        # sequence (measured: 4 streams cost 74 ms a step instead of 29 ms).
        decoding = sorted(
            ((a, s) for a in self._running if a.decoding for s in a.seqs if not s.done), key=lambda x: x[1].seq_id
        )
        speculate = self.spec is not None and self.spec.active_for(len(decoding))
        plain = [(a, s) for a, s in decoding if not (speculate and s.draft)]
        if not speculate:
            for _, seq in plain:
                seq.draft = []  # stale by the time speculation resumes
        for act, seq in decoding:
            if speculate and seq.draft:
                self._speculative_step(act, seq)
        plain = [(a, s) for a, s in plain if not s.done]  # a failed speculative step may end a request
        if plain:
            # Every token takes the attention path it takes alone: lone long ones get a companion row.
            lone = companion_rows([(s.seq_id, s.n_past) for _, s in plain], self._cells_for_companions())
            self._decode_single_tokens(plain, {plain[i][1].seq_id for i in lone}, speculate)
        act = next((a for a in self._running if not a.decoding), None)
        if act is not None:
            self._prefill_chunk(act)
        self._running = [a for a in self._running if not all(s.done for s in a.seqs)]
        if self.spec is not None and not self.spec.ranks and m.embeddings:
            m.set_embeddings(False)  # the tuning switched speculation off: stop producing hidden states
            m.embeddings = False

    def _cells_for_companions(self) -> int:
        # 0 turns companion rows off: a recurrent state would advance over the throwaway token.
        return self.model.n_cells if self.model.attention_only else 0

    def _decode_single_tokens(self, group: list[tuple[_Active, _Seq]], companions: set[int], speculate: bool) -> None:
        """One llama_decode of each sequence's next token (seq-id order); a sequence in `companions`
        also gets a throwaway row at its next position, dropped right after (decode_plan)."""
        m = self.model
        m.batch_clear()
        slots = []
        for act, seq in group:
            slots.append((act, seq, m.batch_add(seq.last_token, seq.n_past, seq.seq_id, True)))
            if seq.seq_id in companions:
                m.batch_add(seq.last_token, seq.n_past + 1, seq.seq_id, False)
        self._decode()
        for _, seq, _ in slots:
            if seq.seq_id in companions:
                m.seq_rm(seq.seq_id, seq.n_past + 1, -1)
        for act, seq, idx in slots:
            self._accept(act, seq, idx)
        if speculate:
            live = [(seq, idx) for _, seq, idx in slots if not seq.done]
            if live:
                drafts = self.spec.drafts(np.stack([m.hidden(idx) for _, idx in live]))
                for (seq, _), draft in zip(live, drafts):
                    seq.draft = draft

    def _speculative_step(self, act: _Active, seq: _Seq) -> None:
        """Decode last_token + the draft in the sequence's own batch (so every row's logits are what
        plain decoding gives), then emit target tokens while they match the draft."""
        m = self.model
        room = min(m.n_ctx_per_seq - 1 - seq.n_past, act.prep.max_tokens - seq.generated - 1)
        draft = seq.draft[: max(0, min(room, TILED_FROM_ROWS - 2))]
        base = seq.n_past
        m.batch_clear()
        m.batch_add(seq.last_token, base, seq.seq_id, True)
        for d, token in enumerate(draft):
            m.batch_add(token, base + 1 + d, seq.seq_id, True)
        if not draft and needs_companion(base, self._cells_for_companions()):
            # No room left for a draft (this is the request's last token): a lone row must not take
            # the split-KV path (decode_plan). Its cell goes when the request finishes.
            m.batch_add(seq.last_token, base + 1, seq.seq_id, False)
        self._decode()
        p = act.prep.sampling
        # Typical acceptance judges a draft token by the temperature-scaled distribution alone, so
        # it applies only where the sampler chain is nothing more (no bias, top-p or penalties).
        typical = self.spec.typical and p.temperature > 0 and not p.logit_bias and p.top_p >= 1.0 and not (
            p.presence_penalty or p.frequency_penalty
        )
        accepted = 0
        for row in range(len(draft) + 1):
            forced = None
            if typical and row < len(draft):
                if typical_ok(m.logits(row), draft[row], p.temperature, self.spec.typical_epsilon, self.spec.typical_alpha):
                    forced = draft[row]
                    self.spec.stats.typical_accepted += 1
            token = self._accept(act, seq, row, forced=forced)
            matched = row < len(draft) and token == draft[row]
            accepted += matched
            if seq.done or not matched:
                break
        if draft:
            self.spec.record(len(draft), accepted)
        if seq.done:
            return
        # Keep the cells of the root and the accepted draft tokens; last_token (the token the
        # last accepted row chose) is decoded next step, at position base + accepted + 1.
        if not m.seq_rm(seq.seq_id, base + accepted + 1, -1):
            # A memory that cannot drop a partial tail (recurrent state) would keep the rejected
            # draft: fail this request and stop speculating rather than emit wrong tokens.
            self.spec.ranks, self.spec.note = [], "off: this model's memory cannot drop a rejected draft"
            self._fail(act, "speculative decoding is not supported by this model's memory; retry")
            return
        seq.draft = self.spec.drafts(m.hidden(accepted))[0]

    def _prefill_chunk(self, act: _Active) -> None:
        m = self.model
        tokens = act.prep.tokens
        want_all = act.prep.req.prompt_logprobs
        start = act.prefilled
        end = min(len(tokens), start + (PROMPT_LOGPROBS_CHUNK if want_all else self.prefill_chunk))
        seq_id = act.seqs[0].seq_id
        m.batch_clear()
        for pos in range(start, end):
            m.batch_add(tokens[pos], pos, seq_id, want_all or pos == len(tokens) - 1)
        if m.embeddings:
            m.set_embeddings(False)
            try:
                self._decode()
            finally:
                m.set_embeddings(True)
        else:
            self._decode()
        self.stats.prompt_tokens += end - start
        if want_all:
            self._collect_prompt_logprobs(act, start, end)
        act.prefilled = end
        if act.decoding:
            self._start_decoding(act, end - start - 1)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rc = self.model.decode()
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.steps += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _start_decoding(self, act: _Active, last_idx: int) -> None:
        req = act.prep.req
        n_prompt = len(act.prep.tokens)
        self._emit(
            act,
            PromptEvent(
                id=act.id,
                prompt_tokens=n_prompt,
                text=act.prep.prompt_text,
                logprobs=act.prompt_logprobs if req.prompt_logprobs else None,
            ),
        )
        main = act.seqs[0].seq_id
        for seq in act.seqs:
            if seq.seq_id != main:
                self.model.seq_cp(main, seq.seq_id)
            seq.n_past = n_prompt - 1
            if act.prep.max_tokens == 0:
                self._finish(act, seq, "length")
            else:
                self._accept(act, seq, last_idx)

    def _accept(self, act: _Active, seq: _Seq, idx: int, forced: int | None = None) -> int:
        """Sample the sequence's next token from output `idx` (or take `forced`, recording it in the
        sampler's history) and emit what it adds. Returns the token."""
        m = self.model
        logits = m.logits(idx)
        if forced is None:
            token = seq.sampler.sample(m.ctx, idx, logits)
        else:
            token = forced
            seq.sampler.accept(token)
        seq.generated += 1
        self.stats.tokens_generated += 1
        seq.n_past += 1
        seq.last_token = token
        if m.is_eog(token) and not act.prep.req.ignore_eos:
            self._finish(act, seq, "stop")
            return token
        text, stopped = seq.text.push(m.token_bytes(token))
        lp = None
        if act.prep.req.logprobs is not None:
            lp = [self._token_logprob(logits, token, act.prep.req.logprobs)]
        self._emit(act, DeltaEvent(id=act.id, index=seq.index, text=text, token_ids=[token], logprobs=lp))
        if stopped:
            self._finish(act, seq, "stop", flush=False)
        elif seq.generated >= act.prep.max_tokens or seq.n_past >= m.n_ctx_per_seq:
            self._finish(act, seq, "length")
        return token

    def _token_logprob(self, logits, token: int, top_n: int) -> TokenLogprob:
        m = self.model
        chosen, top = log_softmax_top(logits, token, top_n)
        piece = m.token_bytes(token)
        return TokenLogprob(
            token_id=token,
            token=piece.decode("utf-8", "replace"),
            bytes=list(piece),
            logprob=chosen,
            top=[
                TopLogprob(token_id=t, token=(b := m.token_bytes(t)).decode("utf-8", "replace"), bytes=list(b), logprob=lp)
                for t, lp in top
            ],
        )

    def _collect_prompt_logprobs(self, act: _Active, start: int, end: int) -> None:
        # Row j's logits predict prompt token j+1.
        tokens = act.prep.tokens
        top_n = act.prep.req.logprobs or 0
        if start == 0:
            piece = self.model.token_bytes(tokens[0])
            act.prompt_logprobs.append(
                TokenLogprob(token_id=tokens[0], token=piece.decode("utf-8", "replace"), bytes=list(piece), logprob=None)
            )
        for j in range(start, min(end, len(tokens) - 1)):
            act.prompt_logprobs.append(self._token_logprob(self.model.logits(j - start), tokens[j + 1], top_n))

    def _finish(self, act: _Active, seq: _Seq, reason: FinishReason, flush: bool = True) -> None:
        if flush and reason != "cancelled":
            tail = seq.text.flush()
            if tail:
                self._emit(act, DeltaEvent(id=act.id, index=seq.index, text=tail, token_ids=[]))
        seq.done = True
        self._emit(
            act, DoneEvent(id=act.id, index=seq.index, finish_reason=reason, completion_tokens=seq.generated)
        )
        self.model.seq_rm(seq.seq_id)
        seq.sampler.close()
        self._free_seq_ids.append(seq.seq_id)

    def _retire(self, act: _Active) -> None:
        if act in self._running:
            self._running.remove(act)

    def _fail(self, act: _Active, message: str) -> None:
        for seq in act.seqs:
            if not seq.done:
                seq.done = True
                self.model.seq_rm(seq.seq_id)
                seq.sampler.close()
                self._free_seq_ids.append(seq.seq_id)
        self._emit(act, ErrorEvent(id=act.id, message=message, code="internal"))
        self._retire(act)
        if act in self._waiting:
            self._waiting.remove(act)

    # --- events ---------------------------------------------------------------------------------
    def _emit(self, act: _Active, event) -> None:
        key = id(act.sink)
        if key not in self._outbox:
            self._outbox[key] = (act.sink, [])
        self._outbox[key][1].append(event)

    def _flush(self) -> None:
        # One hand-over per sink per step, not one per token.
        for sink, events in self._outbox.values():
            sink(events)
        self._outbox.clear()
