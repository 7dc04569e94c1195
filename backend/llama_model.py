"""A loaded GGUF and its llama.cpp context, through llama-cpp-python's low-level bindings.

Owns the llama_model, llama_context and one llama_batch. Everything that touches the context must
run on the engine thread; tokenizing and reading vocabulary/metadata only reads the model and may
run anywhere.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as llama
import numpy as np

from backend.devices import gpus, list_devices

log = logging.getLogger("backend.llama")

_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 2 INFO, 3 WARN, 4 ERROR


@llama.llama_log_callback
def _llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp is chatty at INFO/DEBUG; forward only warnings and errors.
    if level in _LOG_LEVELS and text:
        log.log(_LOG_LEVELS[level], text.decode("utf-8", "replace").rstrip())


@dataclass(frozen=True)
class ContextConfig:
    n_ctx_per_seq: int  # 0: min(training context, 4096)
    n_parallel: int
    n_threads: int  # 0: all cores
    n_batch: int
    extra_buffers: bool  # llama.cpp's repack/AMX weight buffers; AMX crashes on some VMs
    embeddings: bool = False  # hidden states out of every decode too (Medusa heads read them)
    n_gpu_layers: int = 0  # -1: every layer when llama.cpp can offload, else 0
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()  # proportions per GPU; empty: llama.cpp's choice
    # Sequences past n_parallel that only hold idle conversations' cells (backend/slots.py, parked
    # streams); -1: 3 x n_parallel + 1 on a model with sliding-window layers, else none.
    n_parked: int = 0


def offload_layers(requested: int, can_offload: bool, n_gpus: int, main_gpu: int, tensor_split: tuple[float, ...]) -> int:
    """The n_gpu_layers to load with (a number past the model's layers means every layer), or a
    ValueError that says why the settings cannot be honoured on this build and machine."""
    if requested == 0 or (requested < 0 and not can_offload):
        return 0
    if not can_offload:
        raise ValueError(
            f"N_GPU_LAYERS={requested} asks for GPU offload, but this llama.cpp cannot offload: a CPU build "
            "(install with GPU=cuda scripts/ensure_venv.sh requirements.txt) or no GPU visible (driver, "
            "CUDA_VISIBLE_DEVICES); set N_GPU_LAYERS=0 to run on the CPU")
    if main_gpu >= max(n_gpus, 1):
        raise ValueError(f"MAIN_GPU={main_gpu}, but llama.cpp sees {n_gpus} GPU(s) (numbered from 0)")
    if len(tensor_split) > max(n_gpus, 1) or (tensor_split and sum(tensor_split) <= 0):
        raise ValueError(f"TENSOR_SPLIT has {len(tensor_split)} proportions for {n_gpus} GPU(s), or they sum to 0")
    return requested if requested > 0 else 2**31 - 1


class LlamaModel:
    def __init__(self, path: Path, cfg: ContextConfig):
        llama.llama_log_set(_llama_log, None)
        llama.llama_backend_init()
        mparams = llama.llama_model_default_params()
        mparams.use_extra_bufts = cfg.extra_buffers
        self.devices = list_devices()
        self.n_gpu_layers = offload_layers(cfg.n_gpu_layers, bool(llama.llama_supports_gpu_offload()),
                                           len(gpus(self.devices)), cfg.main_gpu, cfg.tensor_split)
        mparams.n_gpu_layers = self.n_gpu_layers
        mparams.main_gpu = cfg.main_gpu
        if cfg.tensor_split and self.n_gpu_layers:
            self._tensor_split = (ctypes.c_float * llama.llama_max_devices())(*cfg.tensor_split)  # kept alive
            mparams.tensor_split = self._tensor_split
        self.path = path
        self.model = llama.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            hint = f" with {cfg.n_gpu_layers if cfg.n_gpu_layers > 0 else 'every'} layer(s) on the GPU: too large for " \
                "its memory? lower N_GPU_LAYERS" if self.n_gpu_layers else ""
            raise RuntimeError(f"llama.cpp could not load the model {path}{hint}")
        self.n_gpu_layers = min(self.n_gpu_layers, llama.llama_model_n_layer(self.model) + 1)  # + the output layer
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.model)
        self.n_ctx_per_seq = cfg.n_ctx_per_seq or min(self.n_ctx_train, 4096)
        self.n_parallel = cfg.n_parallel
        self.n_batch = cfg.n_batch
        self.bos = llama.llama_vocab_bos(self.vocab)
        self.eos = llama.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab))

        cparams = llama.llama_context_default_params()
        # One KV stream per sequence (kv_unified off): a sequence's cells then lie in position order
        # whatever other sequences do, so its attention, and its greedy output, is exactly what it
        # would be alone; and no query attends over other sequences' masked cells.
        # Parked streams: a saved state of a sliding-window model restores differently from a cold
        # prefill past the window (llama.cpp saves only the window's cells), but a stream copied whole
        # (llama_memory_seq_cp across streams copies the buffer, cell for cell) keeps every logit.
        # The default holds 3 conversations per slot, plus the one stream a swap needs (a conversation
        # copied back into a slot whose own cells are parked first, while every stream is full).
        n_swa = llama.llama_model_n_swa(self.model)
        self.n_parked = (3 * cfg.n_parallel + 1 if n_swa > 0 else 0) if cfg.n_parked < 0 else cfg.n_parked
        cparams.n_ctx = self.n_ctx_per_seq * (cfg.n_parallel + self.n_parked)
        cparams.n_batch = cfg.n_batch
        cparams.n_ubatch = cfg.n_batch
        cparams.n_seq_max = cfg.n_parallel + self.n_parked
        cparams.kv_unified = False
        if cfg.embeddings:
            # Post-norm hidden state per output token (pooling NONE), next to the logits.
            cparams.embeddings = True
            cparams.pooling_type = llama.LLAMA_POOLING_TYPE_NONE
        cparams.swa_full = True  # removing cells from a sliding-window cache needs the full-size one
        threads = cfg.n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = llama.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            where = "GPU memory for the KV cache? lower CTX_SIZE, N_PARALLEL or N_GPU_LAYERS" if self.n_gpu_layers else "memory?"
            raise RuntimeError(f"llama.cpp could not create a context (out of {where})")
        self.memory = llama.llama_get_memory(self.ctx)
        # Cross-stream copies llama.cpp runs at the next decode: the sequences they write, and read.
        self._copies_pending: set[int] = set()
        self._copy_sources: set[int] = set()
        self.n_seq_max = cparams.n_seq_max
        # KV cells per sequence: n_ctx_per_seq rounded up to 256 by llama.cpp.
        self.n_cells = llama.llama_n_ctx_seq(self.ctx)
        # A memory with recurrent state cannot take a throwaway row and drop it again.
        self.attention_only = not (llama.llama_model_is_recurrent(self.model) or llama.llama_model_is_hybrid(self.model))
        self.n_embd = llama.llama_model_n_embd(self.model)
        # Sliding-window attention layers (Gemma 3: 512): a saved state keeps only the window's cells
        # (llama_kv_cache::state_write drops the masked ones), and one restored past the window gives
        # other logits than a cold prefill; parked streams keep them instead.
        self.n_swa = n_swa
        self.embeddings = cfg.embeddings
        self.batch = llama.llama_batch_init(cfg.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)

    # --- metadata -------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = llama.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    # --- vocabulary -----------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The token's text as raw bytes (special tokens render as nothing). Engine thread: it
        writes the model's one piece buffer."""
        return self._piece(token, self._piece_buf, False)

    def pieces(self, tokens: list[int]) -> list[bytes]:
        """Each token's text as raw bytes, special tokens as written (any thread: its own buffer)."""
        buf = ctypes.create_string_buffer(256)
        return [self._piece(t, buf, True) for t in tokens]

    def _piece(self, token: int, buf, special: bool) -> bytes:
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:  # longer than the buffer: once more with one that fits
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        arr = (llama.llama_token * max(1, len(tokens)))(*tokens)
        cap = len(tokens) * 16 + 16
        buf = ctypes.create_string_buffer(cap)
        n = llama.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, True, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_detokenize(self.vocab, arr, len(tokens), buf, -n, True, False)
        return buf.raw[:n].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def special_text(self, token: int) -> str:
        """The text of a special token such as BOS, for chat templates."""
        raw = llama.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    # --- decoding (engine thread only) ----------------------------------------------------------
    def batch_clear(self) -> None:
        self.batch.n_tokens = 0

    def batch_add(self, token: int, pos: int, seq_id: int, output: bool) -> int:
        """Append one token to the batch; returns its index (the output index if `output`)."""
        b = self.batch
        i = b.n_tokens
        if i >= self.n_batch:  # the ctypes arrays are not bounds-checked: writing past them corrupts memory
            raise RuntimeError(f"more than BATCH_SIZE={self.n_batch} tokens in one llama_decode")
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = output
        b.n_tokens = i + 1
        return i

    def prefill(self, tokens: list[int], seq_id: int) -> np.ndarray:
        """Decode a whole prompt (at most n_batch tokens) on a fresh sequence with only its last
        token as output, hidden-state output off meanwhile; returns that token's logits view."""
        self.seq_rm(seq_id)
        hidden_on = self.embeddings
        if hidden_on:
            self.set_embeddings(False)  # else every prompt token becomes an output
        try:
            self.batch_clear()
            for i, t in enumerate(tokens):
                self.batch_add(t, i, seq_id, i == len(tokens) - 1)
            if self.decode() != 0:
                raise RuntimeError("llama_decode failed on a prompt")
        finally:
            if hidden_on:
                self.set_embeddings(True)
        return self.logits(len(tokens) - 1)

    def decode(self) -> int:
        # llama_decode applies pending stream copies before anything else
        self._copies_pending.clear()
        self._copy_sources.clear()
        return llama.llama_decode(self.ctx, self.batch)

    def logits(self, i: int) -> np.ndarray:
        """A zero-copy view of the logits of batch index i (valid until the next decode)."""
        ptr = llama.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def hidden(self, i: int) -> np.ndarray:
        """A zero-copy view of the post-norm hidden state of batch index i (embeddings on)."""
        ptr = llama.llama_get_embeddings_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    def set_embeddings(self, on: bool) -> None:
        """Turn hidden-state output off for a while (prompt chunks: with it on, every token of a batch
        becomes an output); `embeddings` keeps saying what the context was made for."""
        llama.llama_set_embeddings(self.ctx, on)

    def stop_hidden_states(self) -> None:
        """For good: nothing will read hidden states again (speculation is off)."""
        self.set_embeddings(False)
        self.embeddings = False

    def state_save(self, seq_id: int) -> np.ndarray:
        """A copy of one sequence's cells (llama_state_seq_get_data): ~2 ms a thousand tokens here."""
        if seq_id in self._copies_pending:
            raise RuntimeError(f"sequence {seq_id} awaits a stream copy (done at the next decode); saving it now would read stale cells")
        size = llama.llama_state_seq_get_size(self.ctx, seq_id)
        buf = np.empty(size, np.uint8)  # not zero-filled, unlike a ctypes array
        got = llama.llama_state_seq_get_data(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, seq_id)
        if got != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return buf

    def state_restore(self, buf: np.ndarray, seq_id: int) -> bool:
        """Put saved cells into a sequence (whose own cells are dropped first)."""
        if seq_id in self._copy_sources or seq_id in self._copies_pending:
            # A restore writes the stream's buffer now, before a pending copy of that stream would read
            # it (or write it): one throwaway token decoded in it (dropped below) runs the copies first.
            self.seq_rm(seq_id)
            self.batch_clear()
            self.batch_add(0, 0, seq_id, False)
            if self.decode() != 0:
                raise RuntimeError("llama_decode failed while running pending stream copies")
        self.seq_rm(seq_id)
        read = llama.llama_state_seq_set_data(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), buf.size, seq_id)
        if read != buf.size:
            self.seq_rm(seq_id)
            return False
        return True

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return llama.llama_memory_seq_rm(self.memory, seq_id, p0, p1)

    def seq_cp(self, src: int, dst: int) -> None:
        """Copy a sequence whole into another. Across streams (every sequence here is one) llama.cpp
        copies the stream's buffer, cell for cell, at the start of the next llama_decode; the cells'
        positions and tokens are there at once. Copies run in the order they were made."""
        llama.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self._copies_pending.add(dst)
        self._copy_sources.add(src)

    def copy_pending(self, seq_id: int) -> bool:
        return seq_id in self._copies_pending

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama.llama_model_free(self.model)
            self.model = None
