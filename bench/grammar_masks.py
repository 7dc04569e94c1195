"""Per-token cost of a grammar's token mask on the model's vocabulary: llguidance against xgrammar.

Walks a valid answer of bench/structured.py's nested schema token by token (the model's own
tokenization), computing the mask before each token and consuming it after, as the engine does;
reports compile time, mask time per token (mean, p50, p99) and the time our engine takes to apply
a mask to one row of logits. xgrammar is optional (it pulls torch and triton): skipped with a note
if it is not installed.

    python -m bench.grammar_masks
"""

from __future__ import annotations

import argparse
import importlib.metadata
import ctypes
import json
import statistics
import time

import numpy as np

from bench.structured import SCHEMA
from common.tool_format import ITEM_SEPARATOR, KEY_SEPARATOR

ANSWER = {
    "order_id": "ORD-004217",
    "customer": {"name": "Camille Martin", "email": "camille.martin@example.fr", "phone": "+33 612 3456",
                 "address": {"street": "12 rue des Fleurs", "city": "Lyon", "postcode": "69002", "country": "France"}},
    "items": [
        {"sku": "FLR-1001", "description": "Wheat flour, 25 kg sack", "quantity": 4, "unit_price": 18.5, "gift_wrap": False},
        {"sku": "YST-2040", "description": "Dry yeast, 500 g", "quantity": 10, "unit_price": 3.2, "gift_wrap": False},
        {"sku": "BTR-3300", "description": "Butter, unsalted, 1 kg", "quantity": 12, "unit_price": 7.9, "gift_wrap": False},
        {"sku": "SGR-0815", "description": "Cane sugar, 5 kg", "quantity": 2, "unit_price": 9.75, "gift_wrap": True},
    ],
    "shipping": {"method": "express", "cost": 14.9, "estimated_days": 2},
    "paid": True,
    "notes": "Deliver to the back door before 6 am.",
}


def load_vocab(path: str):
    import llama_cpp as llama

    params = llama.llama_model_default_params()
    params.vocab_only = True
    model = llama.llama_model_load_from_file(path.encode(), params)
    vocab = llama.llama_model_get_vocab(model)
    return llama, model, vocab


def tokenize(llama, vocab, text: str) -> list[int]:
    data = text.encode()
    buf = (llama.llama_token * (len(data) + 16))()
    n = llama.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
    return list(buf[:n])


def pieces(llama, vocab) -> list[bytes]:
    out, buf = [], ctypes.create_string_buffer(256)
    for t in range(llama.llama_vocab_n_tokens(vocab)):
        n = llama.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
        out.append(bytes(buf[:n]))
    return out


def summary(times_s: list[float]) -> dict:
    us = sorted(t * 1e6 for t in times_s)
    return {"mean_us": round(statistics.mean(us), 1), "p50_us": round(us[len(us) // 2], 1),
            "p99_us": round(us[min(len(us) - 1, int(0.99 * len(us)))], 1), "tokens": len(us)}


def bench_llguidance(llama, vocab, n_vocab: int, tokens: list[int]) -> dict:
    import llguidance
    from llguidance.llamacpp import lltokenizer_from_vocab

    from backend.grammar import JSON_DEFAULTS, apply_mask

    t0 = time.perf_counter()
    tok = lltokenizer_from_vocab(vocab)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_DEFAULTS)
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
    logits = np.random.default_rng(0).standard_normal(n_vocab).astype(np.float32)
    masks, applies, forced = [], [], 0
    for t in tokens:
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        masks.append(time.perf_counter() - t0)
        assert (mask[t // 32] >> (t % 32)) & 1, f"token {t} masked out"
        row = logits.copy()
        t0 = time.perf_counter()
        apply_mask(row, mask)
        applies.append(time.perf_counter() - t0)
        forced += bool(matcher.compute_ff_tokens())
        assert matcher.consume_token(t), matcher.get_error()
    return {"library": f"llguidance {llguidance.__version__}", "tokenizer_build_s": round(tokenizer_s, 3),
            "compile_ms": round(compile_s * 1000, 2), "mask": summary(masks), "apply_mask": summary(applies),
            "positions_with_forced_tokens": forced}


def bench_xgrammar(piece_list: list[bytes], eos: int, tokens: list[int]) -> dict:
    import torch
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(piece_list, vocab_type=xgr.VocabType.RAW, vocab_size=len(piece_list), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                            separators=(ITEM_SEPARATOR, KEY_SEPARATOR), strict_mode=True)
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, len(piece_list))
    masks = []
    for t in tokens:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        masks.append(time.perf_counter() - t0)
        assert matcher.accept_token(t), f"xgrammar rejected token {t}"
    return {"library": f"xgrammar {importlib.metadata.version('xgrammar')}", "torch": torch.__version__, "tokenizer_build_s": round(tokenizer_s, 3),
            "compile_ms": round(compile_s * 1000, 2), "mask": summary(masks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    a = p.parse_args()
    from backend.model_files import resolve_model

    path = str(resolve_model(a.model))
    llama, model, vocab = load_vocab(path)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    text = json.dumps(ANSWER, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))
    tokens = tokenize(llama, vocab, text)
    report = {"model": path, "n_vocab": n_vocab, "answer_tokens": len(tokens), "results": []}
    report["results"].append(bench_llguidance(llama, vocab, n_vocab, tokens))
    try:
        report["results"].append(bench_xgrammar(pieces(llama, vocab), llama.llama_vocab_eos(vocab), tokens))
    except ImportError as e:
        report["notes"] = [f"xgrammar not measured: {e}"]
    llama.llama_model_free(model)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
