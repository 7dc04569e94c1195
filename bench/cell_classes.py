"""Which prompt chunkings write equal KV cells: the classes the exact prompt cache relies on
(backend/decode_plan.py, CellRules).

    python -m bench.cell_classes [--model default] [--at 1700] [--rows 28]   # ~1 minute

After the same tiled prefix of --at tokens, the next --rows tokens are written several ways (one-row
decodes with a companion row as the engine decodes, chunks of 4 and 7 rows, one chunk, splits of it,
and 64- and 100-row chunks that end at the same place, moved back over the prefix), then the same
six tokens are decoded one by one. The matrix prints the largest logit difference of those later
tokens between each pair ("=": bit-identical). The prompt is a long text written here.
"""

from __future__ import annotations

import argparse

import numpy as np

from backend.llama_model import ContextConfig, LlamaModel
from backend.model_files import resolve_model
from bench.decode_paths import TEXT

SEQ = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--at", type=int, default=1700)
    ap.add_argument("--rows", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = LlamaModel(resolve_model(args.model), ContextConfig(4096, 1, args.threads, 512, False))
    toks = m.tokenize(" ".join([TEXT] * 4), True)[: args.at + args.rows + 8]
    at, rows = args.at, args.rows

    def chunk(start: int, end: int, companion: bool = False) -> None:
        m.batch_clear()
        for p in range(start, end):
            m.batch_add(toks[p], p, SEQ, p == end - 1)
        if companion:
            m.batch_add(toks[start], start + 1, SEQ, False)
        assert m.decode() == 0
        if companion:
            m.seq_rm(SEQ, start + 1, -1)

    def later() -> np.ndarray:
        out = []
        for p in range(at + rows, at + rows + 6):
            chunk(p, p + 1, companion=True)
            out.append(m.logits(0).copy())
        return np.stack(out)

    def written(sizes: list[int], back: int = 0) -> np.ndarray:
        m.seq_rm(SEQ)
        for s in range(0, at - back, 256):
            chunk(s, min(at - back, s + 256))
        pos = at - back
        for k in sizes:
            chunk(pos, pos + k, companion=k == 1)
            pos += k
        return later()

    cases = {
        f"1 x {rows} decodes": written([1] * rows), f"chunks of 7": written([7] * (rows // 7) + [rows % 7] * bool(rows % 7)),
        "chunks of 4": written([4] * (rows // 4) + [rows % 4] * bool(rows % 4)), "2+5+7+...": written([2, 5] + [7] * ((rows - 7) // 7) + [(rows - 7) % 7] * bool((rows - 7) % 7)),
        f"one chunk of {rows}": written([rows]), f"8+{rows - 8}": written([8, rows - 8]), f"{rows // 2}+{rows - rows // 2}": written([rows // 2, rows - rows // 2]),
        f"64 ending at {at + rows}": written([64], back=64 - rows), f"100 ending at {at + rows}": written([100], back=100 - rows),
    }
    names = list(cases)
    width = max(map(len, names))
    print(" " * width, " ".join(f"{i:>6d}" for i in range(len(names))))
    for i, a in enumerate(names):
        cells = []
        for b in names:
            d = float(np.abs(cases[a] - cases[b]).max())
            cells.append("=" if d == 0 else f"{d:.2g}")
        print(f"{a:>{width}s}", " ".join(f"{c:>6s}" for c in cells), f"  [{i}]")
    m.close()


if __name__ == "__main__":
    main()
