"""Heads initialised from the base model itself: zero ResBlocks (identity) and the base model's
output projection, restricted to a vocabulary subset with a token map.

Such a head proposes the base model's own next token, which is Medusa-1's starting point before
training (and, untrained, a draft that is right whenever the text repeats). Reads the projection
out of the GGUF with the `gguf` package, dequantising only the rows it keeps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.spec.heads import Head, MedusaHeads


def output_rows(gguf_path: Path, token_ids: np.ndarray) -> np.ndarray:
    """Rows token_ids of the model's output projection (the tied embedding if it has no output.weight)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors["token_embd.weight"]
    rows = np.asarray(t.data)[np.asarray(token_ids)]
    return dequantize(rows, t.tensor_type).astype(np.float32).reshape(len(token_ids), -1)


def base_initialised_heads(gguf_path: Path, n_heads: int, token_ids: np.ndarray) -> MedusaHeads:
    token_ids = np.asarray(sorted(set(int(t) for t in token_ids)), dtype=np.int64)
    proj = output_rows(gguf_path, token_ids)
    hidden = proj.shape[1]
    heads = [
        Head([(np.zeros((hidden, hidden), np.float32), np.zeros(hidden, np.float32))], proj.copy())
        for _ in range(n_heads)
    ]
    return MedusaHeads(heads, token_map=token_ids)
