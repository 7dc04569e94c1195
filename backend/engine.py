"""The engine thread: continuous batching over one llama.cpp context.

Each step is schedule -> run -> postprocess: the scheduler (backend/scheduler.py) admits waiting
requests to KV slots (backend/slots.py, the prompt cache) and composes the step; the engine runs
its llama_decode calls (a Medusa verify decode per speculating sequence, one decode of a token for
every other decoding sequence, one prompt chunk, or an idle chunk when nothing else runs); each
sequence (backend/sequence.py) turns its chosen tokens into events, handed to each request's sink
once per step. Requests join and leave between steps. Only this thread touches the context.

A draft is verified in its sequence's own decode: Medusa's guesses, or the tokens a grammar forces
(fast-forward: a forced run costs one decode). Either way each row's token is chosen exactly as
plain decoding would choose it, so the output does not depend on drafts.

A request with n choices prefills its prompt once on its first sequence, then copies those cells to
the other choices' sequences (llama_memory_seq_cp) instead of prefilling n times.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np

from backend.decode_plan import companion_rows, needs_companion
from backend.grammar import GrammarError
from backend.llama_model import LlamaModel
from backend.logprobs import prompt_logprobs
from backend.metrics import EngineMetrics
from backend.spec.tree import typical_ok
from backend.spec.verify import verify
from backend.prepare import PreparedRequest
from backend.scheduler import Scheduler
from backend.sequence import Request, Sequence, Sink
from backend.slots import CacheMode, SlotManager
from backend.spec.speculator import Speculator
from backend.spec.verify_rows import UNMEASURED_ROWS, VerifyLimit
from common.protocol import DoneEvent, ErrorEvent, PromptEvent

log = logging.getLogger("backend.engine")

# Idle work (re-prefilling a finished conversation's answer for the exact prompt cache) starts only
# after the engine has had nothing else to do for this long. A llama_decode cannot be interrupted, so
# a request that arrives during an idle chunk (64..128 rows: 200-300 ms on 2 cores) waits for it; and a
# client that sends its next turn as soon as its answer ends (agents, tools, benchmarks) arrives
# 40-160 ms after the engine's last step here (measured through the HTTP stack). With 50 ms the idle
# chunk usually started just before such a turn and cost it ~200 ms (bench.multiturn scenario a:
# 481 ms against 273 ms without idle work); a person's next message comes seconds later either way.
IDLE_AFTER_S = 0.5


@dataclass
class EngineStats:
    steps: int = 0  # llama_decode calls
    tokens_generated: int = 0
    prompt_tokens: int = 0  # prompt tokens prefilled (not those reused from the cache)
    decode_seconds: float = 0.0
    # Wall time of the loop's iterations that ran a step (planning, llama_decode, sampling, drafting,
    # handing events over): minus decode_seconds, the host's share of a step.
    step_seconds: float = 0.0
    forced_drafted: int = 0  # grammar-forced tokens proposed as drafts
    forced_accepted: int = 0  # of those, tokens the model chose too


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        prefill_chunk: int = 256,
        speculator: Speculator | None = None,
        cache_mode: CacheMode = "exact",
        cache_ram_bytes: int = 0,
        fast_forward: bool = True,
        metrics: EngineMetrics | None = None,
        limit: VerifyLimit | None = None,
        cache_answers: bool = True,
    ):
        """limit: the most rows of a verify decode and the EXACTNESS mode (backend/spec/verify_rows.py;
        default the CPU's measured 7 rows, strict). Under fast, no companion rows are added.
        cache_answers: PROMPT_CACHE_ANSWERS=reuse (backend/decode_plan.canonical_ends)."""
        if speculator is not None and speculator.on and not model.embeddings:
            raise ValueError("Medusa needs a context with embeddings on")
        self.model = model
        self.spec = speculator
        self.metrics = metrics
        self.stats = EngineStats()
        self.limit = limit or VerifyLimit(UNMEASURED_ROWS, "strict")
        rules = replace(self.limit.cell_rules, answers=cache_answers)  # PROMPT_CACHE_ANSWERS
        self.slots = SlotManager(model, cache_mode, prefill_chunk, cache_ram_bytes, rules)
        self.scheduler = Scheduler(self.slots, prefill_chunk, fast_forward, self.limit.max_draft)
        if speculator is not None:  # a lone sequence's companion row can carry a draft token instead
            speculator.companion_cells = self._cells_for_companions()
        self._commands: queue.Queue = queue.Queue()
        self._outbox: dict[int, tuple[Sink, list]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._stop = False
        self._last_work = 0.0  # monotonic time of the last step that served a request
        self._n_decoding = 0  # sequences decoding in the current step
        self._judge_turn = 0  # which sequence's Medusa draft is judged when not every one is drafted

    # --- API for other threads ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    def submit(self, prep: PreparedRequest, sink: Sink) -> None:
        self._commands.put(("submit", Request(prep, sink)))

    def cancel(self, ids: list[str]) -> None:
        self._commands.put(("cancel", set(ids)))

    def call(self, fn: Callable[[LlamaModel], object], timeout_s: float = 60.0):
        """Run fn(model) on the engine thread between steps and return its result. The prompt cache
        forgets every free slot afterwards, since fn may have used their cells (tests, tools)."""
        fut: Future = Future()
        self._commands.put(("call", (fn, fut)))
        return fut.result(timeout=timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # --- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._take_commands(self._wait_for())
            t0 = time.perf_counter()
            admitted = self.scheduler.admit()
            started = time.monotonic()
            if self.metrics is not None:
                for req in admitted:
                    self.metrics.queue.observe(started - req.submitted)
            idle_ok = started - self._last_work >= IDLE_AFTER_S
            step = self.scheduler.plan(self.spec, idle_ok)
            serves = bool(step.speculative or step.plain or step.prefill)
            if serves:
                self._last_work = started
            if not step.empty:
                generated = self.stats.tokens_generated
                try:
                    self._run(step)
                except Exception as e:  # never let one bad step kill the thread
                    log.exception("engine step failed")
                    for req in list(self.scheduler.running):
                        self._fail(req, f"internal engine error: {e}")
                    if step.idle is not None:
                        self.slots.reset(step.idle[0])
                if serves and self.metrics is not None:
                    self.metrics.step(time.monotonic() - started, self.stats.tokens_generated - generated)
            self._postprocess()
            if not step.empty:
                self.stats.step_seconds += time.perf_counter() - t0
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(req, "the model server is shutting down")
        self._flush()

    def _wait_for(self) -> float:
        """How long the loop may wait for a command: not at all while requests run or a cut answer's
        last token waits for its cell, until idle work is due when there is some, else half a second
        (then it looks again)."""
        if self.scheduler.busy or self.slots.has_tail_work():
            return 0.0
        if self.slots.has_idle_work():
            return max(0.0, IDLE_AFTER_S - (time.monotonic() - self._last_work))
        return 0.5

    def _take_commands(self, timeout: float) -> None:
        try:
            cmd = self._commands.get(timeout=timeout) if timeout > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "stop":
                self._stop = True
            elif kind == "submit":
                self.scheduler.add(arg)
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "call":
                self._call(*arg)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _call(self, fn, fut: Future) -> None:
        try:
            fut.set_result(fn(self.model))
        except Exception as e:
            fut.set_exception(e)
        finally:
            for slot in self.slots.slots:
                if not slot.busy:
                    self.slots.reset(slot)

    def _cancel(self, ids: set[str]) -> None:
        for req in [r for r in self.scheduler.waiting if r.id in ids]:
            self.scheduler.remove(req)
            for i in range(req.prep.req.n):
                self._emit(req.sink, DoneEvent(id=req.id, index=i, finish_reason="cancelled", completion_tokens=0))
        for req in [r for r in self.scheduler.running if r.id in ids]:
            for seq in req.seqs:
                if not seq.finished:
                    self._emit(req.sink, *seq.finish("cancelled"))

    # --- run ------------------------------------------------------------------------------------
    def _run(self, step) -> None:
        self._n_decoding = len(step.speculative) + len(step.plain)  # how deep Medusa drafts depends on it
        for seq, draft, source in step.speculative:
            if not seq.finished:  # an earlier failure in this step may have ended its request
                self._speculative_step(seq, draft, source)
        plain = [s for s in step.plain if not s.finished]
        if plain:
            self._decode_tokens(plain)
        if step.prefill is not None:
            self._prefill_chunk(*step.prefill)
        if step.idle is not None:
            slot, tokens, start, end = step.idle
            self._decode_prompt(tokens, start, end, slot.seq_id, output=False)
            self.slots.idle_done(slot, tokens, start, end)

    def _cells_for_companions(self) -> int:
        # 0 turns companion rows off: a recurrent state would advance over the throwaway token, and
        # EXACTNESS=fast lets a lone row take the split-KV path as llama-server's does.
        return self.model.n_cells if self.model.attention_only and self.limit.exactness == "strict" else 0

    def _decode_tokens(self, seqs: list[Sequence]) -> None:
        """One llama_decode of each sequence's next token (sequence-id order); a lone sequence past
        position 255 also gets a throwaway row at its next position, dropped right after, so that
        every token takes the attention path it takes next to others (decode_plan)."""
        m = self.model
        lone = {seqs[i].seq_id for i in companion_rows([(s.seq_id, s.n_past) for s in seqs], self._cells_for_companions())}
        m.batch_clear()
        rows = []
        for seq in seqs:
            rows.append(m.batch_add(seq.last_token, seq.n_past, seq.seq_id, True))
            if seq.seq_id in lone:
                m.batch_add(seq.last_token, seq.n_past + 1, seq.seq_id, False)
        if len(rows) + len(lone) > self.limit.rows:  # wider than a verify: not the cells one-by-one decoding writes
            for seq in seqs:
                seq.vec_cells = False
        took = self._decode()
        if self.spec is not None:  # one sequence with a companion: the shape of a 1-token draft's verify
            self.spec.observe(*(("chain", 2) if lone and len(seqs) == 1 else ("batch", len(seqs))), took)
        for seq in seqs:
            if seq.seq_id in lone:
                m.seq_rm(seq.seq_id, seq.n_past + 1, -1)
        for seq, row in zip(seqs, rows):
            if not seq.finished:  # a grammar failure ends every choice of its request
                self._take(seq, row)
        if self.spec is not None and self.spec.on and m.embeddings:  # Medusa drafts for the next step
            live = [(seq, row) for seq, row in zip(seqs, rows) if not seq.finished]
            depth, every = self.spec.drafting(self._n_decoding, self.spec.lone_plain_rows([s for s, _ in live]))
            for seq, _ in live:
                seq.draft = []
            if live and depth:
                if not every:  # one sequence, each in turn
                    self._judge_turn += 1
                some = live if every else [live[self._judge_turn % len(live)]]
                drafts = self.spec.drafts(np.stack([m.hidden(row) for _, row in some]), [seq.last_token for seq, _ in some], depth)
                for (seq, _), draft in zip(some, drafts):
                    seq.draft = draft

    def _take(self, seq: Sequence, row: int, forced: int | None = None) -> int:
        """Choose and add the sequence's next token from `row`; returns it (a failed request's
        sequences come back finished)."""
        try:
            events = seq.step(row, forced)
        except GrammarError as e:
            self._fail(seq.request, f"the output grammar could not continue: {e}")
            return -1
        self.stats.tokens_generated += 1
        self._emit(seq.request.sink, *events)
        return seq.last_token

    def _speculative_step(self, seq: Sequence, draft: list[int], source: str) -> None:
        """Decode last_token + the draft in the sequence's own batch (so every row's logits are what
        plain decoding gives), then emit target tokens while they confirm the draft. `source`: who
        drafted it ("medusa", "lookup", or "forced": starting with grammar-forced tokens)."""
        m = self.model
        room = min(m.n_ctx_per_seq - 1 - seq.n_past, seq.max_tokens - seq.generated - 1)
        draft = draft[: max(0, min(room, self.limit.max_draft))]  # rows exact as one by one (verify_rows)
        base = seq.n_past
        m.batch_clear()
        m.batch_add(seq.last_token, base, seq.seq_id, True)
        for d, token in enumerate(draft):
            m.batch_add(token, base + 1 + d, seq.seq_id, True)
        if not draft and needs_companion(base, self._cells_for_companions()):
            # No room left for a draft (this is the request's last token): a lone row must not take
            # the split-KV path (decode_plan). Its cell goes when the request finishes.
            m.batch_add(seq.last_token, base + 1, seq.seq_id, False)
        if len(draft) + 1 > self.limit.rows:  # EXACTNESS=fast's long verifies
            seq.vec_cells = False
        took = self._decode()
        spec = self.spec
        if spec is not None:
            spec.observe("chain", len(draft) + 1, took)
        typical = (spec is not None and spec.typical and source == "medusa" and seq.constraint is None
                   and _typical_applies(seq.request.prep.sampling))

        def choose_row(row: int) -> tuple[int, bool]:
            forced = None
            if typical and row < len(draft):
                if typical_ok(m.logits(row), draft[row], seq.sampler.params.temperature,
                              spec.typical_epsilon, spec.typical_alpha):
                    forced = draft[row]
                    spec.verified[source].typical_accepted += 1
            return self._take(seq, row, forced), seq.finished

        accepted = verify(draft, choose_row)
        if source == "forced":
            self.stats.forced_drafted += len(draft)
            self.stats.forced_accepted += accepted
        if draft and spec is not None:
            spec.record(source, len(draft), accepted)
        if seq.finished:
            return
        # Keep the cells of the root and the accepted draft tokens; last_token (the token the
        # last accepted row chose) is decoded next step, at position base + accepted + 1.
        if not m.seq_rm(seq.seq_id, base + accepted + 1, -1):
            # A memory that cannot drop a partial tail (recurrent state) would keep the rejected
            # draft: fail this request and stop speculating rather than emit wrong tokens.
            if spec is not None:
                spec.disable("off: this model's memory cannot drop a rejected draft")
            self._fail(seq.request, "speculative decoding is not supported by this model's memory; retry")
            return
        seq.draft = []
        if spec is not None and spec.on and m.embeddings:
            depth, _ = spec.drafting(self._n_decoding, spec.lone_plain_rows([seq]))
            if depth:
                seq.draft = spec.drafts(m.hidden(accepted), [seq.last_token], depth)[0]

    def _prefill_chunk(self, req: Request, start: int, end: int) -> None:
        main = req.seqs[0]
        want_all = req.prep.req.prompt_logprobs
        self._decode_prompt(req.tokens, start, end, main.seq_id, output=True, all_rows=want_all)
        self.stats.prompt_tokens += end - start
        self.slots.prefilled(main.slot, req.tokens, start, end)
        if want_all:
            top_n = req.prep.req.logprobs or 0
            req.prompt_logprobs += prompt_logprobs(self.model, req.tokens, start, end, top_n, self.model.logits)
        req.prefilled = end
        req.chunk_ends.pop(0)
        if req.decoding:
            self._start_decoding(req, end - start - 1)

    def _decode_prompt(self, tokens: list[int], start: int, end: int, seq_id: int, output: bool, all_rows: bool = False) -> None:
        """One prompt chunk of one sequence, hidden-state output off (else every row is an output). A
        one-row chunk past position 255 gets a companion row, as a decode step does (decode_plan), so
        that its cell is the one decoding writes (the prompt cache's VEC class)."""
        m = self.model
        m.batch_clear()
        for pos in range(start, end):
            m.batch_add(tokens[pos], pos, seq_id, all_rows or (output and pos == end - 1))
        companion = end - start == 1 and needs_companion(start, self._cells_for_companions())
        if companion:
            m.batch_add(tokens[start], start + 1, seq_id, False)
        if m.embeddings:
            m.set_embeddings(False)
            try:
                self._decode()
            finally:
                m.set_embeddings(True)
        else:
            self._decode()
        if companion:
            m.seq_rm(seq_id, start + 1, -1)

    def _decode(self) -> float:
        """One llama_decode of the batch; returns its seconds."""
        t0 = time.perf_counter()
        rc = self.model.decode()
        took = time.perf_counter() - t0
        self.stats.decode_seconds += took
        self.stats.steps += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return took

    def _start_decoding(self, req: Request, last_row: int) -> None:
        p = req.prep
        self._emit(req.sink, PromptEvent(
            id=req.id, prompt_tokens=len(p.tokens), cached_tokens=req.cached_tokens, text=p.prompt_text,
            logprobs=req.prompt_logprobs if p.req.prompt_logprobs else None,
        ))
        main = req.seqs[0]
        # Every choice's first token comes from the same row; a grammar masks that row in place, so
        # each choice gets the model's own logits back first (its logprobs are the raw ones too).
        raw = self.model.logits(last_row).copy() if p.grammar is not None and len(req.seqs) > 1 else None
        for seq in req.seqs:
            if seq.finished:  # a grammar failure on an earlier choice failed the whole request
                break
            if raw is not None:
                np.copyto(self.model.logits(last_row), raw)
            if seq is not main:
                self.slots.copy(main.slot, seq.slot)
            if p.max_tokens == 0:
                self._emit(req.sink, *seq.finish("length"))
            else:
                self._take(seq, last_row)

    # --- postprocess ----------------------------------------------------------------------------
    def _postprocess(self) -> None:
        for req in self.scheduler.retire():
            for seq in req.seqs:
                cut = seq.last_token if seq.finish_reason == "length" else None
                self.slots.release(seq.slot, seq.kept_tokens(), len(req.tokens), seq.vec_cells, req.prep.spans is not None, cut)
        if self.spec is not None and not self.spec.on and self.model.embeddings:
            self.model.stop_hidden_states()  # speculation is off for good: stop producing hidden states
        self._flush()

    def _fail(self, req: Request, message: str) -> None:
        """End a request with an error event: its slots forget their cells (they may be half written)."""
        for seq in req.seqs:
            if not seq.finished:
                seq.finished = True
                seq.sampler.close()
            self.slots.reset(seq.slot)
        self.scheduler.remove(req)
        self._emit(req.sink, ErrorEvent(id=req.id, message=message, code="internal"))

    def _emit(self, sink: Sink, *events) -> None:
        key = id(sink)
        if key not in self._outbox:
            self._outbox[key] = (sink, [])
        self._outbox[key][1].extend(events)

    def _flush(self) -> None:
        # One hand-over per sink per step, not one per token.
        for sink, events in self._outbox.values():
            sink(events)
        self._outbox.clear()


def _typical_applies(p) -> bool:
    # Typical acceptance judges a draft token by the temperature-scaled distribution alone, so it
    # applies only where the sampler chain is nothing more (no bias, top-k, top-p or penalties).
    return (p.temperature > 0 and not p.logit_bias and not p.top_k and p.top_p >= 1.0
            and not (p.presence_penalty or p.frequency_penalty))
