"""Quantise a GGUF through llama.cpp's own llama_model_quantize (no other binary needed).

    python -m backend.quantize model-f16.gguf model-q8_0.gguf --type q8_0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import llama_cpp as llama

# The types worth offering; the names are llama-quantize's.
TYPES = {
    "f32": llama.LLAMA_FTYPE_ALL_F32,
    "f16": llama.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": llama.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": llama.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q6_k": llama.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q5_k_m": llama.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q5_0": llama.LLAMA_FTYPE_MOSTLY_Q5_0,
    "q4_k_m": llama.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q4_0": llama.LLAMA_FTYPE_MOSTLY_Q4_0,
}


class QuantizeError(RuntimeError):
    pass


def quantize(src: Path, dst: Path, qtype: str = "q8_0", threads: int = 0) -> Path:
    if qtype not in TYPES:
        raise QuantizeError(f"unknown type {qtype!r}; one of {', '.join(TYPES)}")
    if not Path(src).is_file():
        raise QuantizeError(f"no such GGUF: {src}")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    params = llama.llama_model_quantize_default_params()
    params.ftype = TYPES[qtype]
    params.nthread = threads or os.cpu_count() or 1
    tmp = Path(str(dst) + ".partial")
    rc = llama.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise QuantizeError(f"llama_model_quantize failed ({rc}) for {src}")
    tmp.rename(dst)
    return Path(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="an F32/F16/BF16 (or any) GGUF")
    ap.add_argument("dst", help="the quantised GGUF to write")
    ap.add_argument("--type", default="q8_0", choices=sorted(TYPES))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    print(quantize(Path(args.src), Path(args.dst), args.type, args.threads))


if __name__ == "__main__":
    main()
