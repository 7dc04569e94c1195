"""Load generator for any OpenAI-compatible base URL (ours, llama-cpp-python's server, llama-server).

Streams greedy requests from a fixed prompt set at fixed concurrency levels and measures, per level:
time to first token (p50/p95), inter-token latency (p50), tokens/s per stream and in aggregate.

    python -m bench.loadgen --base-url http://127.0.0.1:8000/v1 --model M --concurrency 1,2,4,8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The history of the Roman Empire begins with",
    "Here is a simple Python function that sorts a list of numbers:",
    "The three most important things to know about photosynthesis are",
    "Dear hiring manager, I am writing to apply for the position of",
    "In the year 2150, humanity finally reached the outer planets, and",
    "A good recipe for tomato soup starts with",
    "The main differences between TCP and UDP are",
]


@dataclass
class RequestResult:
    ttft_s: float
    itl_s: list[float]
    tokens: int
    duration_s: float
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    stream_tok_s: float  # mean over requests of tokens / (last token - first token)
    aggregate_tok_s: float  # all tokens / wall time of the level
    results: list[RequestResult] = field(default_factory=list, repr=False)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def one_request(client: httpx.AsyncClient, api: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/completions"
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return RequestResult(0, [], 0, 0, error=f"{r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") if api != "chat" else (choice.get("delta") or {}).get("content")
                    if text:
                        stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        return RequestResult(0, [], 0, 0, error=type(e).__name__)
    if not stamps:
        return RequestResult(0, [], 0, time.perf_counter() - t0, error="no tokens")
    tokens = usage_tokens or len(stamps)
    return RequestResult(
        ttft_s=stamps[0] - t0,
        itl_s=[b - a for a, b in zip(stamps, stamps[1:])],
        tokens=tokens,
        duration_s=stamps[-1] - t0,
    )


async def run_level(base_url: str, api: str, model: str, concurrency: int, max_tokens: int, rounds: int) -> LevelResult:
    """`concurrency` streams at once, each running `rounds` requests back to back."""
    prompts = iter(PROMPTS * (rounds * concurrency // len(PROMPTS) + 1))
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0)) as client:
        async def worker(my_prompts: list[str]) -> list[RequestResult]:
            return [await one_request(client, api, model, p, max_tokens) for p in my_prompts]

        work = [[next(prompts) for _ in range(rounds)] for _ in range(concurrency)]
        t0 = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(w) for w in work))
        wall = time.perf_counter() - t0
    results = [r for rs in per_worker for r in rs]
    ok = [r for r in results if r.error is None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        ttft_p50_ms=percentile([r.ttft_s * 1000 for r in ok], 50),
        ttft_p95_ms=percentile([r.ttft_s * 1000 for r in ok], 95),
        itl_p50_ms=percentile([x * 1000 for r in ok for x in r.itl_s], 50),
        stream_tok_s=statistics.mean((r.tokens - 1) / (r.duration_s - r.ttft_s) for r in ok if r.tokens > 1) if ok else 0.0,
        aggregate_tok_s=sum(r.tokens for r in ok) / wall,
        results=results,
    )


async def sweep(base_url: str, api: str, model: str, levels: list[int], max_tokens: int, rounds: int, warmup: bool = True) -> list[LevelResult]:
    if warmup:
        await run_level(base_url, api, model, 1, 8, 1)
    return [await run_level(base_url, api, model, c, max_tokens, rounds) for c in levels]


def level_dict(level: LevelResult) -> dict:
    d = asdict(level)
    d.pop("results")
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api", choices=["completions", "chat"], default="completions")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    a = p.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    out = asyncio.run(sweep(a.base_url.rstrip("/"), a.api, a.model, levels, a.max_tokens, a.rounds))
    print(json.dumps([level_dict(lv) for lv in out], indent=2))


if __name__ == "__main__":
    main()
