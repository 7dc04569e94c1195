"""Random Medusa heads of any shape in the project's heads format, for timing only.

    python -m bench.random_heads OUT.safetensors [--shape 7b|tiny|HIDDEN,VOCAB] [--heads 5] [--layers 1]

The format is MedusaHeads.save's: FasterDecoding's key layout (`{h}.{l}.linear.weight|bias`,
`{h}.{L}.weight`) in safetensors. The default shape is Vicuna-7B's (hidden 4096, vocabulary
32000): five heads of one 4096x4096 ResBlock and a 32000x4096 projection, 1.5 GB in float16. The
head cost does not depend on weight values. Random heads' drafts are nearly always rejected, so they
measure cost and exactness, not acceptance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHAPES = {"7b": (4096, 32000), "tiny": (128, 1024)}  # (hidden, vocabulary); tiny: bench.device_check's TINY GGUF


def parse_shape(shape: str) -> tuple[int, int]:
    if shape in SHAPES:
        return SHAPES[shape]
    hidden, vocab = (int(x) for x in shape.split(","))
    return hidden, vocab


def write_random_heads(path: Path, hidden: int, vocab: int, n_heads: int = 5, layers: int = 1, seed: int = 0,
                       dtype=np.float16) -> Path:
    from backend.spec import heads as m

    rng = np.random.default_rng(seed)
    # One random draw per tensor shape, each head's a row rotation of it: distinct weights per head at
    # a fifth of the drawing time (7B shape: ~10 s instead of ~35 s here).
    w = (rng.standard_normal((hidden, hidden), dtype=np.float32) * hidden ** -0.5).astype(dtype)
    b = (rng.standard_normal(hidden, dtype=np.float32) * 0.01).astype(dtype)
    proj = (rng.standard_normal((vocab, hidden), dtype=np.float32) * hidden ** -0.5).astype(dtype)
    heads = [m.Head([(np.roll(w, 7 * k + layer, axis=0), np.roll(b, k + layer)) for layer in range(layers)],
                    np.roll(proj, 101 * k, axis=0)) for k in range(n_heads)]
    m.MedusaHeads(heads).save(Path(path), {"note": f"random heads, seed {seed}, for timing only"}, dtype=dtype)
    return Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="7b", help="7b, tiny or HIDDEN,VOCAB")
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--layers", type=int, default=1, help="ResBlocks per head")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    hidden, vocab = parse_shape(args.shape)
    path = write_random_heads(Path(args.out), hidden, vocab, args.heads, args.layers, args.seed)
    print(f"{path}: {args.heads} heads, hidden {hidden}, vocabulary {vocab}, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
