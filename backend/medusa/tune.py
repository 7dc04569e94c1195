"""Tune Medusa to this machine and model: which draft length pays, and under how many streams.

    python -m backend.medusa.tune --model M.gguf --heads heads.safetensors --out tree.json

1. The verify cost curve: the time of one llama_decode of k tokens of one sequence (k = 1..64), and
   of one token from each of S sequences (S = 1..n_parallel), on this machine.
2. Per-head acceptance on a prompt set: greedy generation with the full top-1 draft, counting at
   each depth how often the draft token is confirmed given every depth before it was.
3. Expected tokens per step of a draft of length L: E(L) = 1 + sum_{d<=L} prod_{j<d} a_j. The best L
   maximises E(L) / cost(L + 1); it must beat plain decoding's 1 / cost(1) or Medusa stays off, and
   speculation continues only while S streams gain from it (E / cost(L+1) > S / cost_S: each
   speculating sequence verifies in its own decode).

The JSON it writes is what MEDUSA_TREE takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from backend.config import BackendSettings
from backend.llama_model import ContextConfig, LlamaModel
from backend.local import run_requests
from backend.medusa.tree import chain
from backend.model_files import resolve_model
from backend.server import ModelService
from common.protocol import GenerationRequest

log = logging.getLogger("backend.medusa.tune")

PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The history of the Roman Empire begins with",
    "Here is a simple Python function that sorts a list of numbers:\n",
    "The three most important things to know about photosynthesis are",
    "Dear hiring manager, I am writing to apply for the position of",
    "In the year 2150, humanity finally reached the outer planets, and",
    "A good recipe for tomato soup starts with",
    "The main differences between TCP and UDP are",
    "To install the package, run the following commands:\n",
    "The capital cities of Europe include Paris, Berlin,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "def fibonacci(n):\n",
]
COST_KS = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64]


def measure_costs(model: LlamaModel, ks: list[int], reps: int) -> tuple[dict[int, float], dict[int, float]]:
    """Median ms of one decode: k tokens of one sequence, and one token from each of S sequences."""
    prompt = model.tokenize(PROMPTS[0], True)
    n_seqs = model.n_parallel
    for s in range(n_seqs):
        model.batch_clear()
        for i, t in enumerate(prompt):
            model.batch_add(t, i, s, i == len(prompt) - 1)
        model.decode()
    pos = len(prompt)

    def timed(fill) -> float:
        times = []
        for _ in range(reps + 1):
            model.batch_clear()
            fill()
            t0 = time.perf_counter()
            if model.decode() != 0:
                raise RuntimeError("llama_decode failed while measuring")
            times.append((time.perf_counter() - t0) * 1000)
            for s in range(n_seqs):
                model.seq_rm(s, pos, -1)
        return statistics.median(times[1:])  # the first warms the graph up

    chain_cost = {k: timed(lambda k=k: [model.batch_add(prompt[-1], pos + j, 0, True) for j in range(k)]) for k in ks}
    batch_cost = {
        s: timed(lambda s=s: [model.batch_add(prompt[-1], pos, q, True) for q in range(s)]) for s in range(1, n_seqs + 1)
    }
    return chain_cost, batch_cost


def expected_tokens(acceptance: list[float], length: int) -> float:
    e, p = 1.0, 1.0
    for a in acceptance[:length]:
        p *= a
        e += p
    return e


def plan(acceptance: list[float], chain_cost: dict[int, float], batch_cost: dict[int, float]) -> dict:
    plain_rate = 1.0 / chain_cost[1]
    options = [
        (expected_tokens(acceptance, n) / chain_cost[n + 1], n) for n in range(1, len(acceptance) + 1) if n + 1 in chain_cost
    ]
    best_rate, best_len = max(options) if options else (0.0, 0)
    result = {
        "acceptance": [round(a, 4) for a in acceptance],
        "cost_ms": {str(k): round(v, 2) for k, v in chain_cost.items()},
        "batch_cost_ms": {str(k): round(v, 2) for k, v in batch_cost.items()},
    }
    if best_rate <= plain_rate:
        return result | {
            "enabled": False,
            "choices": [],
            "reason": (
                f"no draft beats plain decoding: best is length {best_len} at "
                f"{best_rate * 1000:.1f} tok/s against {plain_rate * 1000:.1f} (acceptance {result['acceptance']})"
            ),
        }
    max_streams = max(s for s in batch_cost if best_rate > s / batch_cost[s]) if any(
        best_rate > s / batch_cost[s] for s in batch_cost
    ) else 1
    e = expected_tokens(acceptance, best_len)
    return result | {
        "enabled": True,
        "choices": [list(c) for c in chain(best_len)],
        "max_streams": max_streams,
        "expected_tokens_per_step": round(e, 4),
        "expected_speedup_one_stream": round(best_rate / plain_rate, 4),
    }


def measure_acceptance(settings: BackendSettings, prompts: list[str], max_tokens: int) -> list[float]:
    service = ModelService(settings)
    service.load()
    if service.error:
        raise RuntimeError(service.error)
    try:
        for i, p in enumerate(prompts):  # one at a time: speculation is on for a single stream
            run_requests(service, [GenerationRequest(id=f"tune-{i}", prompt=p, max_tokens=max_tokens, temperature=0.0)])
        return [a or 0.0 for a in service.speculator.stats.as_dict()["per_head_acceptance"]]
    finally:
        service.engine.shutdown()
        service.model.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="GGUF path or 'default'")
    ap.add_argument("--heads", required=True, help="Medusa head checkpoint")
    ap.add_argument("--out", required=True, help="where to write the tuning JSON (MEDUSA_TREE)")
    ap.add_argument("--prompts", help="a file of prompts, one per line (default: a built-in set)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--max-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-parallel", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    path = resolve_model(args.model, None)
    model = LlamaModel(path, ContextConfig(0, args.n_parallel, args.threads, 512, False, embeddings=True))
    chain_cost, batch_cost = measure_costs(model, [k for k in COST_KS if k <= args.max_k], args.reps)
    model.close()
    log.info("cost ms: %s; %d streams: %s", chain_cost, args.n_parallel, batch_cost)

    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else PROMPTS
    settings = BackendSettings(
        model=str(path), medusa_heads=args.heads, medusa_max_streams=1, threads=args.threads, n_parallel=args.n_parallel
    )
    acceptance = measure_acceptance(settings, [p for p in prompts if p.strip()], args.max_tokens)
    result = plan(acceptance, chain_cost, batch_cost) | {"model": path.name, "heads": str(args.heads)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s: %s", args.out, {k: result[k] for k in ("enabled", "choices") if k in result})
    if not result["enabled"]:
        log.warning("medusa stays off: %s", result["reason"])


if __name__ == "__main__":
    main()
