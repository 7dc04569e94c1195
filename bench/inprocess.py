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


def _round(service, prompts: list[str], c: int, r: int, max_tokens: int, tag: str) -> dict:
    """c requests at once (prompts picked by round r); their timings."""
    from backend.local import run_requests

    reqs = [GenerationRequest(id=f"{tag}-{c}-{r}-{i}", prompt=prompts[(r * c + i) % len(prompts)],
                              max_tokens=max_tokens, temperature=0, ignore_eos=True) for i in range(c)]
    t0 = time.perf_counter()
    out = {"ttft": [], "itl": [], "rates": [], "tokens": 0}
    for res in run_requests(service, reqs).values():
        times = res.choices[0].token_times
        out["ttft"].append(times[0] - res.submitted)
        out["itl"] += [b - a for a, b in zip(times, times[1:])]
        out["rates"].append((len(times) - 1) / (times[-1] - times[0]))
        out["tokens"] += len(times)
    out["wall"] = time.perf_counter() - t0
    return out


def _level(c: int, rounds: list[dict]) -> dict:
    ttft = [x * 1000 for r in rounds for x in r["ttft"]]
    itl = [x * 1000 for r in rounds for x in r["itl"]]
    return dict(concurrency=c, requests=sum(len(r["rates"]) for r in rounds), errors=0,
                ttft_p50_ms=percentile(ttft, 50), ttft_p95_ms=percentile(ttft, 95), itl_p50_ms=percentile(itl, 50),
                stream_tok_s=statistics.mean(x for r in rounds for x in r["rates"]),
                aggregate_tok_s=sum(r["tokens"] for r in rounds) / sum(r["wall"] for r in rounds))


def engine_levels(service, levels: list[int], max_tokens: int, rounds: int, prompts: list[str] = PROMPTS) -> list[dict]:
    return interleaved_levels({"engine": service}, levels, max_tokens, rounds, prompts)["engine"]


def interleaved_levels(services: dict, levels: list[int], max_tokens: int, rounds: int,
                       prompts: list[str] = PROMPTS) -> dict[str, list[dict]]:
    """Each round runs the same requests through every service in turn, so a machine that speeds up
    or slows down during the run favours none of them."""
    for name, service in services.items():
        _round(service, prompts, 1, 0, 8, f"warm-{name}")
    out = {name: [] for name in services}
    for c in levels:
        per = {name: [] for name in services}
        for r in range(rounds):
            for name, service in services.items():
                per[name].append(_round(service, prompts, c, r, max_tokens, name))
        for name in services:
            out[name].append(_level(c, per[name]))
    return out


def floor_levels(model, levels: list[int], max_tokens: int) -> list[dict]:
    """k streams decoded as k single tokens per llama_decode, greedy by argmax: no scheduling at all."""
    out = []
    for k in levels:
        if k > model.n_parallel:
            continue
        prompts = [model.tokenize(PROMPTS[i % len(PROMPTS)], add_special=True) for i in range(k)]
        last = [int(model.prefill(toks, s).argmax()) for s, toks in enumerate(prompts)]
        pos = [len(toks) for toks in prompts]
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
