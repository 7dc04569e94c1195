"""The dashboard without Prometheus: a live load run on our stack, both layers' /metrics scraped every
second, and the Grafana dashboard's main panels (deployment/grafana/dashboards/llm-serve.json) drawn
from the scrapes with matplotlib: rates over a sliding window, histogram quantiles interpolated
within buckets as PromQL's histogram_quantile does.

The load ramps 1 -> 4 -> 8 concurrent clients: chat turns that share a system prompt (prompt cache),
streamed completions, and JSON-schema answers; 8 clients on 4 slots queue in the batcher.

    python -m bench.metrics_plot                  # ~2 minutes; writes docs/metrics-<date>.png
    python -m bench.metrics_plot --phase-s 10     # shorter phases
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import random
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.compare import ROOT, Proc, wait_openai
from common.ports import free_port
from common.wait_ready import wait_ready

SYSTEM = ("You are the help desk of a bicycle shop in Utrecht. Answer in one or two sentences, politely, "
          "and mention the shop's opening hours (9 to 18, closed on Sunday) when it helps. ") * 4
QUESTIONS = ["Do you repair e-bikes?", "How much is a new chain?", "Can I rent a cargo bike?", "Are you open on Sunday?",
             "Do you sell helmets for children?", "How long does a puncture repair take?", "Can I pay by card?"]
PROMPTS = ["The history of the bicycle begins", "A recipe for a simple tomato soup:", "Ten tips for a long train journey:",
           "def parse_date(text):", "The weather in the mountains can change"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                                           "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"], "additionalProperties": False}
WINDOW_S = 5.0


Scrape = tuple[float, dict[tuple[str, tuple], float]]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def client_loop(base: str, model: str, stop_at: float, rng: random.Random, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        while time.monotonic() < stop_at:
            kind = rng.random()
            if kind < 0.5:
                path, body = "/v1/chat/completions", {"messages": [{"role": "system", "content": SYSTEM},
                                                                  {"role": "user", "content": rng.choice(QUESTIONS)}]}
            elif kind < 0.85:
                path, body = "/v1/completions", {"prompt": rng.choice(PROMPTS), "stream": True}
            else:
                path, body = "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "Invent a person."}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
            body |= {"model": model, "max_tokens": rng.choice([24, 48, 64]), "temperature": 0.7, "seed": rng.randrange(1 << 30)}
            async with http.stream("POST", path, json=body) as r:
                await r.aread()
                stats[r.status_code] = stats.get(r.status_code, 0) + 1


async def load(base: str, model: str, phases: list[tuple[int, float]], stats: dict) -> None:
    rng = random.Random(7)
    for clients, seconds in phases:
        print(f"  {clients} client(s) for {seconds:.0f} s", file=sys.stderr)
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(client_loop(base, model, stop_at, random.Random(rng.random()), stats) for _ in range(clients)))


def value(s: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in s.items() if n == name and all(dict(lab).get(k) == w for k, w in labels.items()))


def rate(series: list[Scrape], name: str, i: int, **labels) -> float | None:
    """Per-second increase of a counter (or histogram _sum/_count) over the window ending at scrape i."""
    j = window_start(series, i)
    if j == i:
        return None
    dt = series[i][0] - series[j][0]
    return (value(series[i][1], name, **labels) - value(series[j][1], name, **labels)) / dt


def window_start(series: list[Scrape], i: int) -> int:
    j = i
    while j > 0 and series[i][0] - series[j - 1][0] <= WINDOW_S:
        j -= 1
    return j


def quantile(series: list[Scrape], name: str, q: float, i: int) -> float | None:
    """histogram_quantile(q, rate(name_bucket[window])) at scrape i."""
    j = window_start(series, i)
    if j == i:
        return None
    buckets = sorted(
        (float(dict(lab)["le"]), v - series[j][1].get((n, lab), 0.0))
        for (n, lab), v in series[i][1].items() if n == f"{name}_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= target:
            if le == float("inf"):
                return lower_bound
            return lower_bound + (le - lower_bound) * (target - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = le, count
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def plot(api: list[Scrape], backend: list[Scrape], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = api[0][0]
    fig, axes = plt.subplots(4, 3, figsize=(16, 15))

    def panel(ax, heading, series, lines, unit=""):
        for label, fn in lines:
            xs, ys = [], []
            for i, (t, _) in enumerate(series):
                y = fn(i)
                if y is not None:
                    xs.append(t - t0)
                    ys.append(y)
            ax.plot(xs, ys, label=label)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("s")
        if unit:
            ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    # /v1 routes only: the scraper's own GET /metrics would count one request a second
    routes = sorted({(dict(lab)["endpoint"], dict(lab)["status"]) for (n, lab) in api[-1][1]
                     if n == "llmserve_requests_total" and dict(lab)["endpoint"].startswith("/v1/")})
    panel(axes[0, 0], "Requests per second by endpoint and status (API)", api,
          [(f"{e} {s}", lambda i, e=e, s=s: rate(api, "llmserve_requests_total", i, endpoint=e, status=s)) for e, s in routes], "req/s")
    for ax, name, heading in ((axes[0, 1], "llmserve_time_to_first_token_seconds", "Time to first token"),
                              (axes[0, 2], "llmserve_inter_token_latency_seconds", "Inter-token latency"),
                              (axes[1, 0], "llmserve_e2e_request_latency_seconds", "End-to-end latency")):
        panel(ax, heading, api, [(f"p{int(q * 100)}", lambda i, q=q, name=name: quantile(api, name, q, i)) for q in (0.5, 0.95)], "s")
    panel(axes[1, 1], "Requests running / waiting", api,
          [("API running", lambda i: value(api[i][1], "llmserve_num_requests_running")),
           ("API waiting (batcher)", lambda i: value(api[i][1], "llmserve_num_requests_waiting"))], "requests")
    panel(axes[1, 2], "Queue time p95", api,
          [("batcher (API)", lambda i: quantile(api, "llmserve_request_queue_time_seconds", 0.95, i))], "s")
    panel(axes[2, 0], "Tokens per second (model server)", backend,
          [("generated", lambda i: rate(backend, "llmserve_generation_tokens_total", i)),
           ("prompt, prefilled", lambda i: rate(backend, "llmserve_prompt_tokens_total", i)),
           ("prompt, from cache", lambda i: rate(backend, "llmserve_prefix_cache_hits_total", i))], "tok/s")
    panel(axes[2, 1], "Batcher: requests per batch", api,
          [("mean batch size", lambda i: ratio(rate(api, "llmserve_batcher_batch_size_sum", i), rate(api, "llmserve_batcher_batch_size_count", i)))])
    panel(axes[2, 2], "Engine step time", backend,
          [(f"p{int(q * 100)}", lambda i, q=q: quantile(backend, "llmserve_engine_step_seconds", q, i)) for q in (0.5, 0.95)], "s")
    panel(axes[3, 0], "Tokens per engine step (mean)", backend,
          [("tokens/step", lambda i: ratio(rate(backend, "llmserve_engine_step_tokens_sum", i), rate(backend, "llmserve_engine_step_tokens_count", i)))])
    positions = sorted({dict(lab)["position"] for (n, lab) in backend[-1][1] if n == "llmserve_spec_decode_num_accepted_tokens_per_pos_total"})
    panel(axes[3, 1], "Medusa acceptance by draft position; on/off", backend,
          [(f"position {p}", lambda i, p=p: ratio(rate(backend, "llmserve_spec_decode_num_accepted_tokens_per_pos_total", i, position=p),
                                                  rate(backend, "llmserve_spec_decode_num_drafts_total", i))) for p in positions]
          + [("speculating (1 = on)", lambda i: value(backend[i][1], "llmserve_spec_decode_enabled"))])
    panel(axes[3, 2], "Prompt cache hit rate (tokens)", backend,
          [("hits / queries", lambda i: ratio(rate(backend, "llmserve_prefix_cache_hits_total", i),
                                              rate(backend, "llmserve_prefix_cache_queries_total", i)))])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase-s", type=float, default=30.0, help="seconds per load phase (1, 4, 8 clients)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    bport, aport = free_port(), free_port()
    env = {"BACKEND_PORT": str(bport), "PORT": str(aport), "THREADS": str(args.threads), "N_PARALLEL": "4", "LOG_LEVEL": "warning"}
    backend = Proc([sys.executable, "-m", "backend"], logs / "metrics-backend.log", env)
    api = None
    try:
        problem = wait_ready(f"http://127.0.0.1:{bport}", timeout_s=180)
        if problem:
            raise RuntimeError(problem)
        api = Proc([sys.executable, "-m", "app"], logs / "metrics-api.log", env)
        base, backend_url = f"http://127.0.0.1:{aport}", f"http://127.0.0.1:{bport}"
        wait_openai(base)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        scrapes: dict[str, list[Scrape]] = {"api": [], "backend": []}
        done = threading.Event()

        def scraper():
            while not done.is_set():
                now = time.monotonic()
                scrapes["api"].append((now, scrape(base)))
                scrapes["backend"].append((now, scrape(backend_url)))
                done.wait(1.0)

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        stats: dict = {}
        time.sleep(2)
        asyncio.run(load(base, model, [(1, args.phase_s), (4, args.phase_s), (8, args.phase_s)], stats))
        time.sleep(3)
        done.set()
        thread.join()
        day = datetime.date.today().isoformat()
        png = out / f"metrics-{day}.png"
        plot(scrapes["api"], scrapes["backend"], png,
             f"llm-serve /metrics during a load run (1 -> 4 -> 8 clients, {args.phase_s:.0f} s each), {day}")
        print(f"statuses: {dict(sorted(stats.items()))}; {len(scrapes['api'])} scrapes; wrote {png}")
    finally:
        for proc in (api, backend):
            if proc is not None:
                proc.stop()


if __name__ == "__main__":
    main()
