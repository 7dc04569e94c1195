"""KV slots that outlive requests: the prompt cache.

A slot is one llama.cpp sequence id, i.e. one KV stream (README, "The engine"). When a request ends,
its slot keeps its cells and the tokens they hold; the next request takes the free slot that lets it
reuse the most, drops the cells past the reusable part and prefills only the rest. Slots whose cells
would be dropped are first copied whole into a parked stream (a sequence past N_PARALLEL that is never
decoded: PARKED_SEQS) and copied back when their conversation returns, cell for cell, so a restored
conversation's logits are a cold prefill's at any length; what parked streams cannot hold is saved
into the RAM tier (backend/ram_tier.py) and restored later.

Which cells are reusable is the exactness rule (backend/decode_plan.py): in `exact` mode each cell's
class (which kernels wrote it: decode-sized, mid-sized or tiled chunks) is recorded, and a request
reuses a cell only where its own cold schedule writes one of the same class, so a request served from
the cache gives token for token what it gives on a fresh server. A chat prompt's cold schedule runs
its earlier answers in decode-sized chunks, so an answer's cells stay as decoding wrote them and the
next turn reuses them; the tokens a completion generated are re-prefilled as tiled cells when the
engine is idle, as a completion continuing them computes them. `fast` mode reuses every cell (as
llama-server does; its measured difference is in the README); `off` keeps nothing.

This module owns the slots and the RAM tier; the engine thread is its only caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from backend.decode_plan import NONE, TILED, TILED_FROM_ROWS, VEC, CellRules, canonical_ends, exact_plan, fast_plan, tiled_chunks
from backend.llama_model import LlamaModel
from backend.ram_tier import RamTier, common_prefix
from common.protocol import PromptCacheReport

log = logging.getLogger("backend.slots")

CacheMode = Literal["exact", "fast", "off"]
IDLE_CHUNK_ROWS = 2 * TILED_FROM_ROWS  # the longest idle re-prefill chunk


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # the tokens whose cells the stream holds, from position 0
    # Exact mode: the class of each leading cell (decode_plan: VEC, MIXED, TILED) as far as it is known.
    classes: bytearray = field(default_factory=bytearray)
    pending: list[int] = field(default_factory=list)  # exact mode: tokens after the cells, to re-prefill when idle
    # Exact mode, chat: the answer's last token when max_tokens cut it (never decoded, so it has no
    # cell), decoded at once when nothing else runs, so that the next turn finds it (one row).
    tail: int | None = None
    last_used: int = 0
    busy: bool = False


@dataclass
class Admission:
    slots: list[Slot]  # the request's choices, the one that prefills first
    reuse: int  # prompt tokens whose cells are reused
    ends: list[int]  # the end of each prompt chunk still to prefill


def pick_slot(free: list[tuple[int, int, int]], busy: set[int]) -> int:
    """The slot a request takes. free: (sequence id, prompt tokens it would reuse, last use).
    Most reuse first; then, among ties and misses, a slot next to a busy one (llama.cpp decodes only
    runs of consecutive sequence ids together: ids 0,1,2,3 take 29 ms a step, 0,2,5,7 77 ms); then
    the least recently used, so the most recent conversations stay cached."""

    def key(c: tuple[int, int, int]) -> tuple:
        seq_id, reuse, last_used = c
        packed = not busy or seq_id - 1 in busy or seq_id + 1 in busy
        return reuse, packed, -last_used

    return max(free, key=key)[0]


class SlotManager:
    def __init__(self, model: LlamaModel, mode: CacheMode, chunk: int, ram_bytes: int, rules: CellRules = CellRules()):
        self.model = model
        self.mode = mode
        self.chunk = chunk
        self.rules = rules  # which cells are equal (measured at load); the default: tiled cells only
        self.slots = [Slot(i) for i in range(model.n_parallel)]
        n = model.n_parallel
        self.parked = [Slot(i) for i in range(n, n + model.n_parked)] if mode != "off" else []
        self.ram = RamTier(ram_bytes) if mode != "off" and ram_bytes > 0 else None
        self._clock = 0
        self.report = PromptCacheReport(mode=mode, ram_capacity_bytes=ram_bytes if self.ram is not None else 0)

    @property
    def free(self) -> int:
        return sum(not s.busy for s in self.slots)

    # --- admission --------------------------------------------------------------------------------
    def admit(self, prompt: list[int], n: int, cacheable: bool, chunk: int,
              spans: list[tuple[int, int]] | None = None) -> Admission | None:
        """Slots for a request of n choices, or None while too few are free. cacheable: False for
        requests whose prompt chunks follow another schedule (prompt logprobs); spans: a chat
        prompt's earlier answers (decode_plan.canonical_ends; None: not a chat prompt)."""
        free = [s for s in self.slots if not s.busy]
        if len(free) < n:
            return None
        use = cacheable and self.mode != "off"
        arr = np.asarray(prompt, np.int32)

        def plan(shared: int, classes: bytes) -> tuple[int, list[int]]:
            if not use:
                return 0, canonical_ends(len(prompt), chunk, spans, self.rules)
            if self.mode == "exact":
                return exact_plan(len(prompt), chunk, spans, self.rules, shared, classes)
            return fast_plan(len(prompt), shared, chunk)

        def slot_plan(slot: Slot) -> tuple[int, list[int]]:
            return plan(self._shared(slot, arr), bytes(slot.classes))

        reuse_of = {s.seq_id: slot_plan(s)[0] for s in free}
        busy = {s.seq_id for s in self.slots if s.busy}
        main = self.slots[pick_slot([(s.seq_id, reuse_of[s.seq_id], s.last_used) for s in free], busy)]
        ram_key, ram_shared = None, 0
        if use and self.ram is not None:
            self.ram.lookups += 1
            ram_key, ram_shared = self.ram.best(arr, self._restorable)
        held = [p for p in self.parked if p.tokens] if use else []
        parked = max(held, key=lambda p: (self._shared(p, arr), p.last_used), default=None)
        park_reuse = slot_plan(parked)[0] if parked is not None else 0
        ram_reuse = plan(ram_shared, self.ram.peek(ram_key).classes)[0] if ram_key is not None else 0
        if park_reuse > reuse_of[main.seq_id] and park_reuse >= ram_reuse:
            # Copy the parked stream into a slot picked as for a miss; that slot's own cells are parked first.
            main = self._miss_slot(free, busy)
            parked.busy = True  # not a place to park them in
            self._evict(main, keep=0)
            parked.busy = False
            self._unpark(parked, main)
        elif ram_key is not None and ram_reuse > reuse_of[main.seq_id]:
            # Restore into a slot picked as for a miss; its own cells go to the RAM tier first.
            main = self._miss_slot(free, busy)
            self._evict(main, keep=0)
            saved = self.ram.get(ram_key)
            if self.model.state_restore(saved.state, main.seq_id):
                main.tokens = saved.tokens.tolist()
                main.classes = bytearray(saved.classes)
            else:
                log.warning("restoring a saved prompt state failed; prefilling instead")
        reuse, ends = slot_plan(main)
        self._evict(main, keep=reuse)
        chosen = [main]
        busy.add(main.seq_id)
        while len(chosen) < n:  # the other choices get the prompt's cells copied after its prefill
            rest = [s for s in free if s not in chosen]
            other = self._miss_slot(rest, busy)
            self._evict(other, keep=0)
            chosen.append(other)
            busy.add(other.seq_id)
        for s in chosen:
            s.busy = True
            self._clock += 1
            s.last_used = self._clock
        if use:
            r = self.report
            r.queries += 1
            r.hits += reuse > 0
            r.tokens_reused += reuse
            r.tokens_prefilled += len(prompt) - reuse
        return Admission(chosen, reuse, ends)

    @property
    def _restorable(self) -> int:
        """The longest saved state a restore may bring back. Measured (tests/test_prompt_cache.py):
        restored states are bit-exact on attention layers, but a sliding-window layer's saved state
        holds only the window's cells, which a restore lays out at other cell indices: past the
        window (Gemma 3: 512 positions) the logits then differ (~1.5). Exact mode restores only
        states within the window on such models; fast mode restores any."""
        if self.mode == "exact" and self.model.n_swa > 0:
            return self.model.n_swa
        return 1 << 62

    def _miss_slot(self, free: list[Slot], busy: set[int]) -> Slot:
        """The free slot a request takes when no slot's own cells serve it (pick_slot without reuse)."""
        return self.slots[pick_slot([(s.seq_id, 0, s.last_used) for s in free], busy)]

    def _shared(self, slot: Slot, prompt: np.ndarray) -> int:
        """Prompt tokens whose cells in this slot may be reused (before the exactness plan)."""
        usable = self._usable(slot)
        return min(usable, common_prefix(np.asarray(slot.tokens[:usable], np.int32), prompt))

    def _usable(self, slot: Slot) -> int:
        """Leading cells a later request may reuse: in exact mode those of a known class."""
        if self.mode != "exact":
            return len(slot.tokens)
        return _known(slot.classes)

    def _evict(self, slot: Slot, keep: int) -> None:
        """Drop the slot's cells past `keep`, keeping its reusable cells first (in a parked stream, else
        in the RAM tier) when what goes is worth a prompt chunk and is not kept yet."""
        usable = self._usable(slot)
        if usable - keep >= self.chunk:
            if self.parked:
                self._park(slot, usable, keep)
            else:
                self._to_ram(slot, keep)
        self.model.seq_rm(slot.seq_id, keep, -1)
        del slot.tokens[keep:]
        del slot.classes[keep:]
        slot.pending, slot.tail = [], None

    def _to_ram(self, slot: Slot, keep: int) -> None:
        """Save the slot's reusable cells (as far as a restore gives them back exactly) to the RAM tier."""
        usable = min(self._usable(slot), self._restorable)
        # A stream that a pending copy is to write holds stale cells until the next decode.
        if self.ram is None or usable - keep < self.chunk or self.model.copy_pending(slot.seq_id):
            return
        tokens = np.asarray(slot.tokens[:usable], np.int32)
        if not self.ram.covers(tokens):
            self.model.seq_rm(slot.seq_id, usable, -1)
            if self.ram.put(tokens, self.model.state_save(slot.seq_id), bytes(slot.classes[:usable])):
                self.report.ram_saves += 1

    def _park(self, slot: Slot, usable: int, keep: int) -> None:
        """Copy the slot's first `usable` cells whole into a parked stream: an empty one, else the least
        recently used one, whose own cells go to the RAM tier first."""
        tokens = slot.tokens[:usable]
        if any(len(p.tokens) >= usable and p.tokens[:usable] == tokens for p in self.parked):
            return  # parked already (a conversation taken back out and not extended since)
        places = [p for p in self.parked if not p.busy]
        if not places:
            self._to_ram(slot, keep)
            return
        target = min(places, key=lambda p: (bool(p.tokens), p.last_used))  # an empty one first
        if target.tokens:
            self._to_ram(target, 0)
        self.model.seq_cp(slot.seq_id, target.seq_id)
        self.model.seq_rm(target.seq_id, usable, -1)
        target.tokens, target.last_used = list(tokens), slot.last_used
        target.classes = bytearray(slot.classes[:usable])
        self.report.parked_saves += 1

    def _unpark(self, parked: Slot, slot: Slot) -> None:
        """A parked conversation back into a slot (whose cells are gone): the stream copied whole."""
        self.model.seq_cp(parked.seq_id, slot.seq_id)
        slot.tokens, slot.classes, slot.pending, slot.tail = list(parked.tokens), parked.classes, [], None
        self.model.seq_rm(parked.seq_id)  # its buffer is read by the copy, which runs before any write
        parked.tokens, parked.classes = [], bytearray()
        self.report.parked_restores += 1

    # --- while a request runs ---------------------------------------------------------------------
    def prefilled(self, slot: Slot, tokens: list[int], start: int, end: int) -> None:
        """Cells [start, end) of `tokens` were written by one prompt chunk."""
        slot.tokens = tokens[:end]
        if len(slot.classes) >= start:
            slot.classes[start:] = bytes([self.rules.of(end - start)]) * (end - start)

    def copy(self, src: Slot, dst: Slot) -> None:
        """Another choice of the same prompt: copy the prompt's cells instead of prefilling again."""
        self.model.seq_cp(src.seq_id, dst.seq_id)
        dst.tokens = list(src.tokens)
        dst.classes = bytearray(src.classes)
        dst.tail = None

    def release(self, slot: Slot, kept: list[int], prompt: int, decoded: bool, chat: bool, cut: int | None = None) -> None:
        """A request ended; its cells hold `kept` (its `prompt` tokens, then generated ones) and stay
        as cache. decoded: every generated cell was written by a decode of at most vec_rows rows (a
        VEC cell); chat: the request was a chat prompt, whose answer the next turn computes as
        decoded (decode_plan.canonical_ends), so it stays as it is, and `cut`, its last token when
        max_tokens ended it, gets its cell next (Slot.tail); other answers are re-prefilled as tiled
        cells when the engine is idle, as a completion that continues them computes them."""
        slot.busy = False
        if self.mode == "off":
            self.reset(slot)
            return
        if self.mode != "exact":
            self.model.seq_rm(slot.seq_id, len(kept), -1)
            slot.tokens, slot.pending = kept, []
            return
        classes = slot.classes[: min(prompt, len(kept))]
        if len(classes) == min(prompt, len(kept)) and decoded and chat and self.rules.segments:
            classes += bytes([VEC]) * (len(kept) - len(classes))
        keep = _known(classes)
        self.model.seq_rm(slot.seq_id, keep, -1)
        slot.tokens, slot.classes = kept[:keep], classes[:keep]
        slot.pending = kept[keep:] if not (chat and self.rules.segments) else []
        # (its cell needs a companion row at the next position: decode_plan.needs_companion)
        slot.tail = cut if chat and self.rules.segments and keep == len(kept) and keep + 1 < self.model.n_cells else None

    def reset(self, slot: Slot) -> None:
        """Forget a slot's cells (after a failure, or when the context was used by hand)."""
        self.model.seq_rm(slot.seq_id)
        slot.tokens, slot.classes, slot.pending, slot.tail, slot.busy = [], bytearray(), [], None, False

    # --- idle work --------------------------------------------------------------------------------
    def has_idle_work(self) -> bool:
        return any((s.pending or s.tail is not None) and not s.busy for s in self.slots)

    def has_tail_work(self) -> bool:
        """A free slot's answer lacks its last token's cell: one row, worth doing at once."""
        return any(s.tail is not None and not s.busy for s in self.slots)

    def idle_chunk(self, long_ok: bool = True) -> tuple[Slot, list[int], int, int] | None:
        """Exact mode, nothing else to do: the next idle chunk, (slot, its tokens, start, end): a free
        slot's cut answer's last token (Slot.tail), else, if long_ok, a chunk that turns a free slot's
        generated tokens into tiled cells (most recently used slot first)."""
        for slot in self.slots:
            if slot.tail is not None and not slot.busy:
                tokens, slot.tail = slot.tokens + [slot.tail], None
                return slot, tokens, len(tokens) - 1, len(tokens)
        if not long_ok:
            return None
        for slot in sorted((s for s in self.slots if s.pending and not s.busy), key=lambda s: -s.last_used):
            tokens = slot.tokens + slot.pending
            if len(tokens) < TILED_FROM_ROWS:
                slot.pending = []
                continue
            # Short chunks, so that a request arriving meanwhile waits for at most ~128 rows (tiled
            # cells are the same whatever the chunk's length).
            start, ends = tiled_chunks(_leading(slot.classes, TILED), len(tokens), min(self.chunk, IDLE_CHUNK_ROWS))
            self.model.seq_rm(slot.seq_id, start, -1)  # cells past the tiled ones are written again
            slot.tokens, slot.pending = tokens[:start], tokens[start:]
            del slot.classes[start:]
            return slot, tokens, start, ends[0]
        return None

    def idle_done(self, slot: Slot, tokens: list[int], start: int, end: int) -> None:
        self.prefilled(slot, tokens, start, end)
        slot.pending = tokens[end:]
        self.report.canonicalized_tokens += end - start

    def stats(self) -> PromptCacheReport:
        r = self.report
        r.parked_seqs, r.parked_entries = len(self.parked), sum(bool(p.tokens) for p in self.parked)
        if self.ram is not None:
            r.ram_entries, r.ram_bytes, r.ram_restores = len(self.ram), self.ram.bytes, self.ram.restores
            r.ram_hit_rate = round(self.ram.restores / self.ram.lookups, 4) if self.ram.lookups else None
        return r.model_copy()


def _known(classes: bytearray) -> int:
    """How many leading cells have a known class."""
    i = classes.find(NONE)
    return len(classes) if i < 0 else i


def _leading(classes: bytearray, cls: int) -> int:
    """How many leading cells are of class `cls`."""
    n = 0
    while n < len(classes) and classes[n] == cls:
        n += 1
    return n
