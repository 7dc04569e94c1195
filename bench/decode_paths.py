"""How llama.cpp's CPU flash attention rounds one token by batch shape, and what a companion row costs.

    python -m bench.decode_paths [--model default] [--positions 100 300 600 900] [--reps 15]

For a greedy continuation at each position, the same token's logits are computed four ways:
alone (one row, one stream: the split-KV path from a KV view of 512 cells), next to another
sequence's token (two streams), with a throwaway companion row after it (two rows, what the engine
does for a lone long sequence, backend/decode_plan.py), and as row 0 of a three-row Medusa-style
decode. It prints the largest logit difference of each against the companion layout, and the
median time of a one-row and a two-row decode there (logits for the first row only, as the engine
decodes a companion). The prompt is a long text written here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from backend.llama_model import ContextConfig, LlamaModel
from backend.model_files import resolve_model

TEXT = " ".join(
    f"Chapter {i}: the caravan crossed the {w} desert, and the traders counted their {g} again."
    for i, (w, g) in enumerate(zip(["red", "white", "long", "silent", "golden"] * 12, ["coins", "camels", "spices"] * 20))
)


def logits_of(m: LlamaModel, rows: list[tuple[int, int, int]], want: int, outputs: set[int] | None = None) -> np.ndarray:
    """Decode (token, pos, seq) rows in one call (logits for `outputs`, default all); the logits of
    row `want`; then drop the new cells."""
    m.batch_clear()
    for i, (token, pos, seq) in enumerate(rows):
        m.batch_add(token, pos, seq, outputs is None or i in outputs)
    assert m.decode() == 0
    out = m.logits(want).astype(np.float64).copy()
    for token, pos, seq in rows:
        m.seq_rm(seq, pos, -1)
    return out


def timed(m: LlamaModel, rows: list[tuple[int, int, int]], reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        logits_of(m, rows, 0, outputs={0})  # as the engine decodes a companion: no logits for it
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--positions", type=int, nargs="+", default=[100, 300, 600, 900])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # A batch of 1024 lets LlamaModel.prefill take every prompt here in one decode.
    m = LlamaModel(resolve_model(args.model, None), ContextConfig(1024, 2, args.threads, 1024, False))
    text = m.tokenize(TEXT, True)
    other = m.tokenize("The capital of France is", True)
    print("| position | alone | two streams | Medusa-style 3 rows | 1 row ms | 1 row + companion ms |")
    print("|---|---|---|---|---|---|")
    for pos in args.positions:
        prompt = text[:pos]
        token = int(m.prefill(prompt, 0).argmax())
        m.prefill(other, 1)
        companion = logits_of(m, [(token, pos, 0), (token, pos + 1, 0)], 0, outputs={0})
        alone = logits_of(m, [(token, pos, 0)], 0)
        streams = logits_of(m, [(token, pos, 0), (other[-1], len(other), 1)], 0)
        rows = logits_of(m, [(token, pos, 0), (token, pos + 1, 0), (token, pos + 2, 0)], 0)
        diff = [float(np.abs(x - companion).max()) for x in (alone, streams, rows)]
        ms = [timed(m, [(token, pos, 0)], args.reps), timed(m, [(token, pos, 0), (token, pos + 1, 0)], args.reps)]
        print(f"| {pos} | {diff[0]:.4f} | {diff[1]:.4f} | {diff[2]:.4f} | {ms[0]:.1f} | {ms[1]:.1f} |", flush=True)
        m.seq_rm(0)
        m.seq_rm(1)
    m.close()


if __name__ == "__main__":
    main()
