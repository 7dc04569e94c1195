"""Model server settings: each field is an env var (upper case) and a flag (--kebab-case)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BackendSettings(BaseSettings):
    model_config = SettingsConfigDict(protected_namespaces=())

    backend_host: str = Field("127.0.0.1", description="address the model server listens on")
    backend_port: int = Field(8001, description="port the model server listens on")
    model: str = Field("default", description="GGUF path, or 'default' for the embedded Gemma 3 270M")
    model_cache: str = Field("", description="where the default model is assembled (~/.cache/llm-serve/models)")
    model_name: str = Field("", description="model id clients send (default: the GGUF file name without .gguf)")
    ctx_size: int = Field(0, description="most tokens per request, prompt + completion (0: min(training ctx, 4096))")
    n_parallel: int = Field(4, ge=1, description="sequences decoded together (continuous batching slots)")
    threads: int = Field(0, ge=0, description="CPU threads for llama.cpp (0: all cores)")
    batch_size: int = Field(512, ge=32, description="most tokens in one llama_decode")
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens per llama_decode (a fixed schedule: output never depends on load)")
    chat_template: str = Field(
        "", description="'transcript', 'gemma', 'vicuna', 'chatml' or a Jinja file; default: the GGUF's own, else "
        "'transcript' for a base model or its family's format"
    )
    n_gpu_layers: int = Field(
        -1, ge=-1, description="model layers offloaded to the GPU (-1: every layer when the llama.cpp build and "
        "the machine can offload, else 0; a number above 0 on a build that cannot is an error at start)"
    )
    main_gpu: int = Field(0, ge=0, description="the GPU holding the model (or its non-split parts) when there are several")
    tensor_split: str = Field(
        "", pattern=r"^$|^[0-9.]+(,[0-9.]+)*$",
        description="proportions of the model per GPU, e.g. '3,1' (empty: llama.cpp splits by free memory)",
    )
    extra_buffers: bool = Field(
        False, description="llama.cpp's extra weight buffers (repack/AMX); AMX crashes on some virtual machines"
    )
    preset: str = Field("", description="a prepared preset (python -m backend.preset NAME): its model, heads, tree, template")
    medusa_heads: str = Field(
        "auto",
        description="Medusa head checkpoint (file or directory); 'auto': the heads shipped for the model (heads/), "
        "if any; 'none': no speculation",
    )
    medusa_tree: str = Field(
        "", description="a fixed draft path verified whole every step: a tuning result (JSON from "
        "backend.medusa.tune), a medusa_choices list, or a file of one; empty: every head's top-1 guess, "
        "verified or not and shortened per step by the plan (measured costs, live acceptance)"
    )
    medusa_max_streams: int = Field(
        0, ge=0, description="verify drafts only while at most this many sequences decode (0: the tuning's, else "
        "the plan decides per step)"
    )
    prompt_lookup: str = Field(
        "auto", pattern="^(auto|off)$",
        description="prompt-lookup drafts (the tokens that followed the last n-gram earlier in prompt or output): "
        "'auto' (verified where the plan says they pay) or 'off'",
    )
    heads_device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?|torch-cpu)$",
        description="where Medusa's heads run: 'auto' (the GPU when the model is offloaded and torch sees CUDA, "
        "else the CPU), 'cpu' (numpy), 'cuda' / 'cuda:N' (torch, fused, float16), 'torch-cpu' (torch on the CPU)",
    )
    medusa_acceptance: str = Field("lossless", pattern="^(lossless|typical)$", description="'lossless' or 'typical' (Medusa's, opt-in)")
    exactness: str = Field(
        "strict", pattern="^(strict|fast)$",
        description="'strict': greedy output depends on nothing but the request (verify decodes only of row "
        "counts measured at load to match one-by-one decoding, companion rows, exact prompt cache); 'fast': "
        "any batch shape llama-server uses (longer verifies, no companion rows, PROMPT_CACHE=fast unless "
        "set): faster, and greedy output may differ from a lone plain run",
    )
    prompt_cache: str = Field(
        "", pattern="^(|exact|fast|off)$",
        description="keep finished requests' KV cells for later prompts sharing a prefix: 'exact' (reuse only "
        "cells a cold prefill computes identically: output never depends on the cache), 'fast' (reuse every "
        "cell, as llama-server does: faster next turns, greedy output may differ), 'off'; default: 'exact', "
        "'fast' under EXACTNESS=fast",
    )
    prompt_cache_answers: str = Field(
        "reuse", pattern="^(reuse|recompute)$",
        description="exact prompt cache, chat prompts: 'reuse' computes a prompt's earlier answers in decode-sized "
        "chunks, as decoding wrote them, so a conversation's next turn reuses its last answer and prefills only its "
        "new message (answers not in the cache cost ~4x a long chunk's time per token); 'recompute' computes them "
        "in long chunks, so a next turn recomputes the answer before it",
    )
    parked_seqs: int = Field(
        -1, ge=-1, le=240,
        description="KV streams past N_PARALLEL that hold idle conversations whole, copied out of a slot a new "
        "prompt needs and back when the conversation returns (exact at any length; each costs a full "
        "stream of CTX_SIZE cells of memory); -1: 3 x N_PARALLEL + 1 on models with sliding-window layers (whose "
        "saved states restore exactly only within the window), else 0; 0: none",
    )
    prompt_cache_ram_mb: int = Field(
        2048, ge=0, description="host memory for saved prompt states behind the slots (0: no RAM tier)"
    )
    grammar_cache: int = Field(64, ge=1, description="compiled grammars (distinct schemas) kept for reuse")
    grammar_fast_forward: bool = Field(
        True, description="verify the tokens a grammar forces as one draft (one decode for a forced run)"
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM/Ctrl-C, how long requests in flight may run on while new ones get 503 (0: stop at once)"
    )
    embeddings: bool = Field(
        True, description="serve embeddings (/v1/embeddings) from a second llama.cpp context on the loaded model"
    )
    embeddings_ctx: int = Field(512, ge=64, description="most tokens per embeddings input")
    embeddings_batch: int = Field(
        512, ge=64, description="most tokens (inputs x their padded length) in one embeddings llama_decode; "
        "at least EMBEDDINGS_CTX"
    )
    log_level: str = Field("info", description="debug, info, warning or error")

    def tensor_split_values(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.tensor_split.split(",")) if self.tensor_split else ()

    @model_validator(mode="after")
    def _cache_follows_exactness(self) -> "BackendSettings":
        if not self.prompt_cache:
            self.prompt_cache = "fast" if self.exactness == "fast" else "exact"
        return self

    @model_validator(mode="after")
    def _batch_holds_a_step(self) -> "BackendSettings":
        # A decode step holds every sequence's token and, for some, a companion row (decode_plan).
        if self.batch_size < 2 * self.n_parallel:
            raise ValueError(f"BATCH_SIZE ({self.batch_size}) must be at least 2 x N_PARALLEL ({self.n_parallel})")
        # A prompt chunk, or a chunk the prompt cache re-balances (up to 127 rows), fits one decode.
        if self.batch_size < max(self.prefill_chunk, 127):
            raise ValueError(f"BATCH_SIZE ({self.batch_size}) must be at least max(PREFILL_CHUNK ({self.prefill_chunk}), 127)")
        return self
