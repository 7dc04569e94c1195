"""The quantize command on small F32, F16 and BF16 GGUFs the test writes: Q8_0 out, loadable,
smaller, and decoding to nearly the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from backend.llama_model import ContextConfig, LlamaModel
from backend.quantize import QuantizeError, quantize
from bench.synthetic_gguf import LlamaShape, write_llama_gguf

SHAPE = LlamaShape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_vocab=1000, n_ctx=256)


def last_logits(path) -> np.ndarray:
    m = LlamaModel(path, ContextConfig(128, 1, 2, 128, False))
    try:
        m.batch_clear()
        for i, t in enumerate([1, 300, 301, 302]):
            m.batch_add(t, i, 0, i == 3)
        assert m.decode() == 0
        return m.logits(3).copy()
    finally:
        m.close()


@pytest.mark.parametrize("source", ["f32", "f16", "bf16"])
def test_to_q8_0(tmp_path, source):
    from gguf import GGMLQuantizationType, GGUFReader

    src = write_llama_gguf(tmp_path / f"m-{source}.gguf", SHAPE, weight_type=source)
    src_types = {t.name: t.tensor_type for t in GGUFReader(str(src)).tensors}
    assert src_types["blk.0.attn_q.weight"] == GGMLQuantizationType[source.upper()]
    dst = quantize(src, tmp_path / "m-q8_0.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in GGUFReader(str(dst)).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    # Q8_0 is 34 bytes per 32 weights: 0.27 of F32, 0.53 of F16/BF16 (plus the unquantised norms).
    assert dst.stat().st_size < {"f32": 0.35, "f16": 0.7, "bf16": 0.7}[source] * src.stat().st_size
    a, b = last_logits(src), last_logits(dst)
    assert np.abs(a).max() > 0.1  # the model is not degenerate
    assert np.corrcoef(a, b)[0, 1] > 0.99  # Q8_0 keeps the model: same logits up to rounding


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(QuantizeError, match="no such GGUF"):
        quantize(tmp_path / "missing.gguf", tmp_path / "out.gguf")
    with pytest.raises(QuantizeError, match="unknown type"):
        quantize(tmp_path / "missing.gguf", tmp_path / "out.gguf", "q9_9")
