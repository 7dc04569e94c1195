"""The arithmetic of tuning Medusa: the verify cost curve of this machine, expected tokens per step
from per-head acceptance, and the plan (draft length, streams) that maximises tokens/s.

E(L) = 1 + sum_{d<=L} prod_{j<d} a_j for a draft of length L with conditional per-depth acceptance
a_j; the best L maximises E(L) / cost(L + 1) and must beat plain decoding's 1 / cost(1); S streams
keep speculating only while E / cost(L + 1) > S / cost_S, since each speculating sequence verifies in
its own decode while plain decoding batches one token of every stream.
"""

from __future__ import annotations

import statistics
import time

from backend.draft_plan import expected_tokens
from backend.llama_model import LlamaModel
from backend.medusa.tree import chain

CALIBRATION_TEXT = "Once upon a time, in a small village at the edge of a great forest, there lived"


COST_KS = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64]


def measure_costs(
    model: LlamaModel, ks: list[int], reps: int, prompt: list[int] | None = None
) -> tuple[dict[int, float], dict[int, float]]:
    """Median ms of one decode: k tokens of one sequence, and one token from each of S sequences."""
    prompt = prompt or model.tokenize(CALIBRATION_TEXT, True)
    n_seqs = model.n_parallel
    for s in range(n_seqs):
        model.prefill(prompt, s)
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
    for s in range(n_seqs):
        model.seq_rm(s)
    return chain_cost, batch_cost


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
