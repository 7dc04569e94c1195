"""The arithmetic of tuning Medusa: expected tokens per step from per-head acceptance over this
machine's verify cost curve (measured by backend/spec/costs.py), and the plan (draft length, streams)
that maximises tokens/s.

E(L) = 1 + sum_{d<=L} prod_{j<d} a_j for a draft of length L with conditional per-depth acceptance
a_j; the best L maximises E(L) / cost(L + 1) and must beat plain decoding's 1 / cost(1); S streams
keep speculating only while E / cost(L + 1) > S / cost_S, since each speculating sequence verifies in
its own decode while plain decoding batches one token of every stream.
"""

from __future__ import annotations

from backend.spec.draft_plan import expected_tokens
from backend.spec.tree import chain


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
