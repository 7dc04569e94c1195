"""In-process baselines on the same GGUF, no HTTP:

- `engine`: our engine driven directly (backend.local.run_requests), the ceiling for the HTTP stack;
- `floor`: a bare llama-cpp-python decode loop (one llama_decode per step, argmax), the floor of
  what any server on llama.cpp can do: 1 stream, and k streams as k tokens per decode.
"""

from __future__ import annotations

import statistics
import time

from bench.loadgen import PROMPTS, percentile
from common.protocol import GenerationRequest


def engine_levels(service, levels: list[int], max_tokens: int, rounds: int) -> list[dict]:
    from backend.local import run_requests

    run_requests(service, [GenerationRequest(id="warm", prompt=PROMPTS[0], max_tokens=8, temperature=0)])
    out = []
    n = 0
    for c in levels:
        ttft, itl, stream_rates, tokens = [], [], [], 0
        t0 = time.perf_counter()
        for r in range(rounds):
            reqs = []
            for i in range(c):
                n += 1
                reqs.append(GenerationRequest(id=f"b{n}", prompt=PROMPTS[(r * c + i) % len(PROMPTS)],
                                              max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for res in run_requests(service, reqs).values():
                ch = res.choices[0]
                times = ch.token_times
                ttft.append(times[0] - res.submitted)
                itl += [b - a for a, b in zip(times, times[1:])]
                stream_rates.append((len(times) - 1) / (times[-1] - times[0]))
                tokens += len(times)
        wall = time.perf_counter() - t0
        out.append(dict(concurrency=c, requests=c * rounds, errors=0,
                        ttft_p50_ms=percentile([x * 1000 for x in ttft], 50),
                        ttft_p95_ms=percentile([x * 1000 for x in ttft], 95),
                        itl_p50_ms=percentile([x * 1000 for x in itl], 50),
                        stream_tok_s=statistics.mean(stream_rates), aggregate_tok_s=tokens / wall))
    return out


def floor_levels(model, levels: list[int], max_tokens: int) -> list[dict]:
    """k streams decoded as k single tokens per llama_decode, greedy by argmax: no scheduling at all."""
    out = []
    for k in levels:
        if k > model.n_parallel:
            continue
        prompts = [model.tokenize(PROMPTS[i % len(PROMPTS)], add_special=True) for i in range(k)]
        last, pos = [], []
        for s, toks in enumerate(prompts):
            model.seq_rm(s)
            model.batch_clear()
            for p, t in enumerate(toks):
                model.batch_add(t, p, s, p == len(toks) - 1)
            assert model.decode() == 0
            last.append(int(model.logits(len(toks) - 1).argmax()))
            pos.append(len(toks))
        steps = []
        for _ in range(max_tokens - 1):
            t0 = time.perf_counter()
            model.batch_clear()
            for s in range(k):
                model.batch_add(last[s], pos[s], s, True)
            assert model.decode() == 0
            for s in range(k):
                last[s] = int(model.logits(s).argmax())
                pos[s] += 1
            steps.append(time.perf_counter() - t0)
        for s in range(k):
            model.seq_rm(s)
        step = statistics.median(steps)
        out.append(dict(concurrency=k, itl_p50_ms=step * 1000, stream_tok_s=1 / step, aggregate_tok_s=k / step))
    return out
