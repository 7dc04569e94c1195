"""Load under CPU contention: N clients against our stack while another process keeps every core busy.

The API must not answer 503 unless the model server itself caused it (e.g. it is loading): under
contention the only statuses are 200 and 429 (queue full, with Retry-After), and every stream ends in
`data: [DONE]`. Each client sends 24-token completions in a loop, every other one streamed, until the
time is up; a CPU hog (one busy process per core, at the same priority) runs throughout.

    python -m bench.contention                           # starts both layers on free ports, 64 clients, 30 s
    python -m bench.contention --clients 64 --duration-s 60 --out bench-results/contention
    python -m bench.contention --base-url http://127.0.0.1:8000 --model M   # an already running stack
    python -m bench.contention --separators   # also prompts the model continues with U+2028 / U+0085, echoed

Prints a JSON summary (statuses, the error bodies of everything that was not a 200, incomplete streams)
and writes it with the stack's logs to --out; exits 1 if anything but 200/429 or an incomplete stream
was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.compare import Proc
from bench.loadgen import PROMPTS, percentile
from common.ports import free_port
from common.wait_ready import wait_ready

ALLOWED = {200, 429}
# Prompts the model continues with line separators (U+2028, U+0085), which JSON carries unescaped: the API
# layer once split the model server's NDJSON events at them and failed whole batches with 503s.
SEPARATED = ["Line one\u2028line two\u2028line three\u2028line four\u2028", "a\x85b\x85c\x85d\x85e\x85"]


@dataclass
class Outcome:
    status: int  # HTTP status; 0 for a transport error (the connection failed or broke)
    stream: bool
    seconds: float
    complete: bool = True  # a 200 stream that ended in data: [DONE] without an in-band error
    error: str | None = None  # the error body (or exception) of anything but a complete 200


@dataclass
class Report:
    clients: int
    duration_s: float
    max_tokens: int
    hog_processes: int
    requests: int = 0
    statuses: dict = field(default_factory=dict)
    incomplete_streams: int = 0
    errors: dict = field(default_factory=dict)  # error text -> count (first 200 characters)
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    ok: bool = True


# A busy loop that ends by itself at a deadline, so a hog outlives no crashed caller for long.
_HOG = "import time\nend = time.time() + {max_s}\nwhile time.time() < end:\n    sum(range(100_000))\n"


class CpuHog:
    """`processes` busy processes (one per core by default) at normal priority, until the block ends or
    `max_s` passes."""

    def __init__(self, processes: int, max_s: float):
        self.processes, self.max_s = processes, max_s
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> CpuHog:
        code = _HOG.format(max_s=float(self.max_s))
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.processes)]
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(timeout=10)


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stream: bool,
               extra: dict | None = None) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            **(extra or {})}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post("/v1/completions", json=body)
            error = None if r.status_code == 200 else r.text
            return Outcome(r.status_code, False, time.perf_counter() - t0, error=error)
        async with client.stream("POST", "/v1/completions", json=body) as r:
            raw = (await r.aread()).decode("utf-8", "replace")
        if r.status_code != 200:
            return Outcome(r.status_code, True, time.perf_counter() - t0, error=raw)
        events = [e for e in raw.split("\n\n") if e.strip()]
        in_band = [e for e in events if e.startswith('data: {"error"')]
        complete = bool(events) and events[-1] == "data: [DONE]" and not in_band
        return Outcome(200, True, time.perf_counter() - t0, complete=complete,
                       error=None if complete else (in_band[0] if in_band else f"ended with {raw[-200:]!r}"))
    except httpx.HTTPError as e:
        return Outcome(0, stream, time.perf_counter() - t0, complete=False, error=f"{type(e).__name__}: {e}")


async def run_load(base_url: str, model: str, clients: int, duration_s: float, max_tokens: int = 24,
                   timeout_s: float = 300.0, prompts: list[str] = PROMPTS, extra: dict | None = None) -> list[Outcome]:
    """`clients` loops, each sending requests back to back (every other one streamed) until `duration_s`
    has passed; requests already sent are waited for. `extra`: more body fields for every request."""
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        async def loop(k: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                prompt = prompts[(k + i) % len(prompts)]
                outcomes.append(await _one(client, model, prompt, max_tokens, (k + i) % 2 == 1, extra))
                i += 1

        await asyncio.gather(*(loop(k) for k in range(clients)))
    return outcomes


def summarize(outcomes: list[Outcome], clients: int, duration_s: float, max_tokens: int, hog: int) -> Report:
    rep = Report(clients=clients, duration_s=duration_s, max_tokens=max_tokens, hog_processes=hog)
    rep.requests = len(outcomes)
    rep.statuses = dict(sorted(collections.Counter(str(o.status) for o in outcomes).items()))
    rep.incomplete_streams = sum(1 for o in outcomes if o.status == 200 and not o.complete)
    rep.errors = dict(collections.Counter((o.error or "")[:200] for o in outcomes if o.error).most_common())
    took = [o.seconds for o in outcomes if o.status == 200]
    rep.latency_p50_s = round(percentile(took, 50), 3) if took else 0.0
    rep.latency_p99_s = round(percentile(took, 99), 3) if took else 0.0
    rep.ok = all(o.status in ALLOWED for o in outcomes) and rep.incomplete_streams == 0
    return rep


def start_stack(out: Path, threads: int, extra_env: dict | None = None) -> tuple[str, str, list[Proc]]:
    """Both layers on free ports, logs in `out`; returns (API base URL, model server URL, processes)."""
    bport, aport = free_port(), free_port()
    env = {"BACKEND_PORT": str(bport), "PORT": str(aport), "HOST": "127.0.0.1", "THREADS": str(threads),
           "N_PARALLEL": "4", "CTX_SIZE": "1024", "LOG_LEVEL": "info", **(extra_env or {})}
    env.pop("BACKEND_URL", None)
    procs = [Proc([sys.executable, "-m", "backend"], out / "backend.log", env)]
    backend_url, base_url = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{aport}"
    try:
        problem = wait_ready(backend_url, timeout_s=300)
        if problem:
            raise RuntimeError(problem)
        procs.append(Proc([sys.executable, "-m", "app"], out / "api.log", {**env, "BACKEND_URL": backend_url}))
        problem = wait_ready(base_url, timeout_s=60)
        if problem:
            raise RuntimeError(problem)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return base_url, backend_url, procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration-s", type=float, default=30.0, help="how long clients keep sending (bounded)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout-s", type=float, default=600.0, help="client timeout per request")
    ap.add_argument("--hog-processes", type=int, default=os.cpu_count() or 2, help="busy processes (0: no hog)")
    ap.add_argument("--threads", type=int, default=0, help="model server THREADS (0: all cores)")
    ap.add_argument("--base-url", default="", help="an already running API layer (else both layers are started)")
    ap.add_argument("--model", default="", help="the model id, with --base-url")
    ap.add_argument("--separators", action="store_true",
                    help="also send prompts full of line separators (U+2028, U+0085), echoed")
    ap.add_argument("--out", default="bench-results/contention", help="summary and stack logs go here")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    base_url, model = args.base_url.rstrip("/"), args.model
    try:
        if not base_url:
            base_url, _, procs = start_stack(out, args.threads)
        if not model:
            model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        print(f"{args.clients} clients, {args.duration_s:.0f} s, {args.hog_processes} hog process(es) -> {base_url}",
              file=sys.stderr)
        with CpuHog(args.hog_processes, max_s=args.duration_s + args.timeout_s + 60):
            prompts, extra = (PROMPTS + SEPARATED, {"echo": True}) if args.separators else (PROMPTS, None)
            outcomes = asyncio.run(run_load(base_url, model, args.clients, args.duration_s, args.max_tokens,
                                            args.timeout_s, prompts, extra))
    finally:
        for p in reversed(procs):
            p.stop()
    rep = summarize(outcomes, args.clients, args.duration_s, args.max_tokens, args.hog_processes)
    text = json.dumps(asdict(rep), indent=2)
    (out / "contention.json").write_text(text + "\n")
    print(text)
    sys.exit(0 if rep.ok else 1)


if __name__ == "__main__":
    main()
