"""Embeddings: a second llama.cpp context on the already loaded model, pooled and normalised vectors.

The engine's generation context is never touched: this module makes its own context from the same
llama_model (weights are shared, nothing is loaded twice) with embeddings on, and runs it on its own
single worker thread behind its own lock, never on the engine thread and never on the event loop.

Pooling is the GGUF's (`{arch}.pooling_type`) when it declares one, else mean. Vectors are scaled to unit
L2 norm, as OpenAI's are, so a dot product is the cosine similarity.

Two ways to run, both deterministic (an input gets bit-identical numbers alone or among others):

- No pooling declared (a generative model, as the default GGUF): the context gives the post-norm hidden
  state of every token (pooling NONE) and we pool here. Inputs are batched, several sequences per
  llama_decode, each padded at its end to the decode's common length. Padding is invisible to the real
  tokens under causal attention, and equal lengths keep llama.cpp from splitting a sequence over
  micro-batches. Two facts measured on ggml's CPU backend decide which inputs may share a decode
  (tests/test_embeddings.py checks them): a decode of fewer than 8 rows computes other numbers than one
  of 8 or more, and flash attention takes its tiled kernel from 64 rows per sequence on (GGML_FA_TILE_Q),
  which rounds differently. So every decode gets at least 8 rows, and inputs shorter than 64 tokens never
  share a decode with longer ones; within those rules the batch's composition changes nothing.
  The vocabulary projection is skipped: an eval callback stops the graph once the hidden states exist
  (on Gemma's 262k vocabulary the output layer would cost more than the rest of the model).
- Pooling declared (an embedding model), or attention that is not causal: llama.cpp pools, with whatever
  the model adds after pooling. Its pooled vector is defined per micro-batch, so a sequence must neither
  be split nor padded; each input gets its own decode, which also keeps its numbers independent of what
  else was asked.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import llama_cpp as llama
import numpy as np

from backend.llama_model import LlamaModel
from common.protocol import EmbedError, EmbedRequest, EmbedResponse

log = logging.getLogger("backend.embeddings")

MIN_DECODE_ROWS = 8  # measured: decodes of 1..7 rows give other numbers than decodes of 8 or more
FA_TILE_ROWS = 64  # ggml CPU flash attention: tiled kernel from 64 query rows per sequence on
MAX_SEQS = 16  # sequences per decode; each has its own KV stream of EMBEDDINGS_CTX cells

Pooling = Literal["mean", "cls", "last"]
# llama_pooling_type values a GGUF may declare; 0 (none) means it declares nothing useful here.
_DECLARED: dict[int, Pooling] = {
    llama.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama.LLAMA_POOLING_TYPE_CLS: "cls",
    llama.LLAMA_POOLING_TYPE_LAST: "last",
}
_POOLING_TYPE = {name: kind for kind, name in _DECLARED.items()}


class EmbedRefused(Exception):
    """A request the model server will not embed; carries the protocol's error body."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = "input"):
        super().__init__(message)
        self.error = EmbedError(message=message, code=code, param=param)


class EmbeddingsUnavailable(Exception):
    """This model cannot give embeddings (a reranker's rank pooling)."""


@dataclass(frozen=True)
class Decode:
    """One llama_decode of the batched path: which inputs (sequence ids 0.. in this order) and how many
    rows each sequence gets (inputs shorter than `length` are padded at the end)."""

    indices: tuple[int, ...]
    length: int


def plan_decodes(lengths: list[int], max_rows: int, max_seqs: int) -> list[Decode]:
    """Group inputs (by token count) into decodes that keep every input's numbers what they are alone:
    short (< 64 tokens) and long inputs apart, at least 8 rows per decode, at most `max_rows` rows and
    `max_seqs` sequences. Sorted by length so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i] >= FA_TILE_ROWS, lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        n = lengths[i]  # sorted: the longest of its group so far
        if g is None or len(g) >= max_seqs or (len(g) + 1) * n > max_rows or (n >= FA_TILE_ROWS) != (lengths[g[0]] >= FA_TILE_ROWS):
            groups.append([i])
        else:
            g.append(i)
    plans = []
    for g in groups:
        longest = max(lengths[i] for i in g)
        plans.append(Decode(tuple(g), max(longest, -(-MIN_DECODE_ROWS // len(g)))))
    return plans


def declared_pooling(model: LlamaModel) -> Pooling | None:
    """The pooling the GGUF declares, None when it declares none; a reranker's is refused."""
    arch = model.meta("general.architecture") or ""
    raw = model.meta(f"{arch}.pooling_type")
    if raw is None or not raw.strip().lstrip("-").isdigit():
        return None
    kind = int(raw)
    if kind == llama.LLAMA_POOLING_TYPE_RANK:
        raise EmbeddingsUnavailable("the GGUF declares rank pooling (a reranker): it scores pairs, it has no embeddings")
    return _DECLARED.get(kind)


def _ggml_get_name():
    """ggml_get_name from the ggml library llama-cpp-python loaded (None if it cannot be found)."""
    try:
        from llama_cpp._ggml import libggml

        fn = libggml.ggml_get_name
    except (ImportError, AttributeError, OSError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
    return fn


class Embedder:
    """The embeddings context and how requests run through it. `embed` is thread-safe (one lock);
    `run` is the coroutine the HTTP route awaits."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, n_threads: int = 0):
        self.model = model
        self.n_embd = model.n_embd
        self.n_ctx = n_ctx = min(n_ctx, model.n_ctx_train)  # positions past training are not worth embedding
        declared = declared_pooling(model)
        self.pooling: Pooling = declared or "mean"
        self.pooling_source = "gguf" if declared else "default"
        # Without causal attention (encoders) padding would be seen by the real tokens: no batching either.
        arch = model.meta("general.architecture") or ""
        causal = (model.meta(f"{arch}.attention.causal") or "true").lower() != "false"
        self.llama_pools = declared is not None or not causal
        # An input never spans two decodes, so a decode holds at least one input of the longest kind.
        self.n_batch = max(n_batch, n_ctx)
        self.max_seqs = 1 if self.llama_pools else MAX_SEQS

        cparams = llama.llama_context_default_params()
        cparams.n_seq_max = self.max_seqs
        cparams.n_ctx = n_ctx * self.max_seqs
        cparams.n_batch = cparams.n_ubatch = self.n_batch  # one micro-batch per decode
        # One KV stream per sequence: a sequence's cells start at 0 whatever else shares the decode.
        cparams.kv_unified = False
        cparams.swa_full = False  # the cache is cleared after every decode, never trimmed
        cparams.embeddings = True
        cparams.pooling_type = _POOLING_TYPE[self.pooling] if self.llama_pools else llama.LLAMA_POOLING_TYPE_NONE
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        self._get_name = None if self.llama_pools else _ggml_get_name()
        if self._get_name is not None:
            self._eval_cb = llama.ggml_backend_sched_eval_callback(self._stop_after_hidden)  # kept alive here
            cparams.cb_eval = self._eval_cb
        self.ctx = llama.llama_init_from_model(model.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the embeddings context (out of memory?)")
        if llama.llama_n_ctx_seq(self.ctx) < n_ctx:
            held = llama.llama_n_ctx_seq(self.ctx)
            llama.llama_free(self.ctx)
            raise RuntimeError(f"the embeddings context holds {held} tokens per input, not {n_ctx}")
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self.lock = threading.Lock()
        # Its own worker: embedding requests queue here, not in the default pool the generation
        # route prepares its requests in.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embeddings")
        self.decodes = 0

    def _stop_after_hidden(self, tensor, ask: bool, _user) -> bool:
        # With pooling NONE llama.cpp names the final-norm output (the hidden states it returns)
        # "result_embd_pooled"; nothing after it but the vocabulary projection is needed. Asked about a
        # node we say whether we want to see it; shown it, returning False ends the graph there. A graph
        # without that name simply runs whole.
        if ask:
            return self._get_name(tensor) == b"result_embd_pooled"
        return False

    # --- requests -------------------------------------------------------------------------------
    async def run(self, req: EmbedRequest) -> EmbedResponse:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.embed, req)

    def embed(self, req: EmbedRequest) -> EmbedResponse:
        """Validate, tokenize and embed a request's inputs, in order; raises EmbedRefused."""
        if req.dimensions is not None and req.dimensions != self.n_embd:
            raise EmbedRefused(
                f"This model gives {self.n_embd}-dimensional embeddings; 'dimensions' {req.dimensions} is not supported "
                "(leave it out or ask for the model's size).", param="dimensions",
            )
        tokens = [self._tokens(i, x) for i, x in enumerate(req.inputs)]
        vectors = self.vectors(tokens)
        return EmbedResponse(vectors=[v.tolist() for v in vectors], prompt_tokens=sum(map(len, tokens)))

    def _tokens(self, i: int, x: str | list[int]) -> list[int]:
        m = self.model
        if isinstance(x, str):
            if not x:
                raise EmbedRefused(f"input[{i}] is an empty string; every input needs some text.")
            try:
                toks = m.tokenize(x, add_special=True)
            except UnicodeEncodeError:
                raise EmbedRefused(f"input[{i}] is not valid Unicode (a lone surrogate).") from None
        else:
            toks = list(x)
            if not toks:
                raise EmbedRefused(f"input[{i}] is an empty token array.")
            bad = next((t for t in toks if not 0 <= t < m.n_vocab), None)
            if bad is not None:
                raise EmbedRefused(f"input[{i}] holds token id {bad}, outside the vocabulary (0..{m.n_vocab - 1}).")
        if len(toks) > self.n_ctx:
            raise EmbedRefused(
                f"input[{i}] has {len(toks)} tokens; this server embeds at most {self.n_ctx} tokens per input "
                "(EMBEDDINGS_CTX). Shorten or split it.", code="context_length_exceeded",
            )
        return toks

    # --- decoding -------------------------------------------------------------------------------
    def vectors(self, token_lists: list[list[int]]) -> list[np.ndarray]:
        """One unit-norm float32 vector per token list (each non-empty, at most n_ctx tokens)."""
        out: list[np.ndarray | None] = [None] * len(token_lists)
        with self.lock:
            if self.llama_pools:
                for i, toks in enumerate(token_lists):
                    out[i] = _unit(self._decode_pooled(toks))
            else:
                for plan in plan_decodes([len(t) for t in token_lists], self.n_batch, self.max_seqs):
                    for i, hidden in zip(plan.indices, self._decode_hidden([token_lists[i] for i in plan.indices], plan.length)):
                        out[i] = _unit(self._pool(hidden))
        return out

    def _pool(self, hidden: np.ndarray) -> np.ndarray:
        if self.pooling == "cls":
            return hidden[0].astype(np.float64)
        if self.pooling == "last":
            return hidden[-1].astype(np.float64)
        return hidden.astype(np.float64).mean(axis=0)

    def _decode_hidden(self, seqs: list[list[int]], length: int) -> list[np.ndarray]:
        """One decode of several sequences padded to `length` rows; each sequence's real rows' hidden states."""
        self._fill(seqs, length)
        self._decode()
        out, row = [], 0
        for toks in seqs:
            out.append(np.stack([self._row(row + p) for p in range(len(toks))]))
            row += length
        return out

    def _decode_pooled(self, toks: list[int]) -> np.ndarray:
        self._fill([toks], len(toks))
        self._decode()
        ptr = llama.llama_get_embeddings_seq(self.ctx, 0)
        if not ptr:
            raise RuntimeError("llama.cpp returned no pooled embedding")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float64)

    def _fill(self, seqs: list[list[int]], length: int) -> None:
        b = self.batch
        i = 0
        for seq_id, toks in enumerate(seqs):
            for pos in range(length):
                b.token[i] = toks[pos] if pos < len(toks) else toks[-1]  # any token: later rows are invisible to earlier ones
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = True  # llama.cpp makes every row an output in an embeddings context anyway
                i += 1
        if i > self.n_batch:  # cannot happen with plan_decodes; the ctypes arrays are not bounds-checked
            raise RuntimeError(f"{i} rows in one embeddings decode (EMBEDDINGS_BATCH={self.n_batch})")
        b.n_tokens = i

    def _decode(self) -> None:
        llama.llama_memory_clear(self.memory, False)  # every decode starts from empty streams
        rc = llama.llama_decode(self.ctx, self.batch)
        self.decodes += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on an embeddings batch")

    def _row(self, i: int) -> np.ndarray:
        ptr = llama.llama_get_embeddings_ith(self.ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no hidden state for row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    def close(self) -> None:
        """Free the context (before the model it was made from)."""
        with self.lock:
            self._worker.shutdown(wait=False, cancel_futures=True)
            if self.batch is not None:
                llama.llama_batch_free(self.batch)
                self.batch = None
            if self.ctx:
                llama.llama_free(self.ctx)
                self.ctx = None


def _unit(v: np.ndarray) -> np.ndarray:
    """Scale to unit L2 norm (computed in float64), as OpenAI's embeddings are; float32 out."""
    norm = float(np.sqrt(np.dot(v, v)))
    return (v / norm if norm > 0 else v).astype(np.float32)


def open_embedder(model: LlamaModel, n_ctx: int, n_batch: int, n_threads: int) -> tuple[Embedder | None, str]:
    """The embedder for this model, or None and why not (the model server still serves generation)."""
    try:
        emb = Embedder(model, n_ctx, n_batch, n_threads)
    except EmbeddingsUnavailable as e:
        log.warning("embeddings off: %s", e)
        return None, str(e)
    except RuntimeError as e:  # no memory for a second context: generation still works
        log.error("embeddings off: %s", e)
        return None, f"embeddings are unavailable on this model server: {e}"
    log.info("embeddings: %d dimensions, %s pooling (%s), up to %d tokens per input", emb.n_embd, emb.pooling,
             "the GGUF's" if emb.pooling_source == "gguf" else "default", emb.n_ctx)
    return emb, ""
