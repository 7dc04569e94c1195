"""This machine's decode costs, measured once at load: the time of one llama_decode of k rows of one
sequence (a verify decode) and of one token from each of S sequences (the shared step). The draft
plan (draft_plan.py) starts from them and follows the decodes the engine runs afterwards."""

from __future__ import annotations

import statistics
import time

from backend.llama_model import LlamaModel

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
