"""A llama-architecture GGUF of any shape with random Q8_0 weights, for timing only.

Decode time does not depend on weight values, so a 7B-shaped file (Vicuna-7B's shape: 32 layers,
4096 hidden, 11008 FFN, 32000 vocabulary) measures the verify cost curve Vicuna-7B Q8_0 would have on
this machine, without downloading it. Tensors of one shape share one random buffer (the output
projection has its own), so writing a 7 GB file needs only a few hundred MB of memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

Q8_0_BLOCK = 32  # weights per block; a block is an fp16 scale and 32 int8 quants (34 bytes)


@dataclass(frozen=True)
class LlamaShape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int = 4096


VICUNA_7B = LlamaShape(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000, n_ctx=2048)


def _q8_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    blocks = cols // Q8_0_BLOCK
    data = np.empty((rows, blocks, 34), dtype=np.uint8)
    data[:, :, :2] = np.frombuffer(np.float16(0.02).tobytes(), dtype=np.uint8)
    data[:, :, 2:] = rng.integers(-127, 128, size=(rows, blocks, 32), dtype=np.int8).view(np.uint8)
    return data.reshape(rows, blocks * 34)


def _dense(rows: int, cols: int, rng: np.random.Generator, dtype) -> np.ndarray:
    return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)


def write_llama_gguf(path: Path, shape: LlamaShape, seed: int = 0, weight_type: str = "q8_0") -> Path:
    """weight_type: "q8_0" (random quants), "f32", "f16" or "bf16" (random normal weights)."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-llama-{shape.n_layer}x{shape.n_embd}")
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type({"q8_0": 7, "f16": 1, "f32": 0, "bf16": 32}[weight_type])
    # A SentencePiece-style vocabulary: specials, the 256 byte tokens, then filler pieces.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"▁t{i}" for i in range(shape.n_vocab - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * (shape.n_vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(shape.n_vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    q8 = {"q8_0": GGMLQuantizationType.Q8_0, "bf16": GGMLQuantizationType.BF16}.get(weight_type)  # raw bytes
    e, f, v = shape.n_embd, shape.n_ff, shape.n_vocab
    kv = e * shape.n_head_kv // shape.n_head
    if weight_type == "q8_0":
        make = _q8_0
    elif weight_type == "bf16":  # gguf's own float32 -> bfloat16 rounding, as llama.cpp's converter writes it
        make = lambda r, c, g: quantize(_dense(r, c, g, np.float32), GGMLQuantizationType.BF16)  # noqa: E731
    else:
        make = lambda r, c, g: _dense(r, c, g, {"f16": np.float16, "f32": np.float32}[weight_type])  # noqa: E731
    shared = {dims: make(*dims, rng) for dims in {(v, e), (e, e), (kv, e), (f, e), (e, f)}}
    ones = np.ones(e, dtype=np.float32)
    w.add_tensor("token_embd.weight", shared[(v, e)], raw_dtype=q8)
    for i in range(shape.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", shared[(e, e)], raw_dtype=q8)
        w.add_tensor(f"blk.{i}.attn_k.weight", shared[(kv, e)], raw_dtype=q8)
        w.add_tensor(f"blk.{i}.attn_v.weight", shared[(kv, e)], raw_dtype=q8)
        w.add_tensor(f"blk.{i}.attn_output.weight", shared[(e, e)], raw_dtype=q8)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", shared[(f, e)], raw_dtype=q8)
        w.add_tensor(f"blk.{i}.ffn_up.weight", shared[(f, e)], raw_dtype=q8)
        w.add_tensor(f"blk.{i}.ffn_down.weight", shared[(e, f)], raw_dtype=q8)
    w.add_tensor("output_norm.weight", ones)
    # An output projection of its own: tied to the embedding, a random model's greedy text is one
    # token repeated (each token's own row scores highest), which no test of training can use.
    w.add_tensor("output.weight", make(v, e, rng), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    return path
