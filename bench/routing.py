"""Routing over several model servers: the affinity policy against round-robin and least-loaded, on a
multi-conversation trace, simulated and live; failover; the router's overhead; the Ray Serve path.

    python -m bench.routing --simulate-only     # seconds: the trace through the policy (app/routing.py)
    python -m bench.routing                     # + live: two model servers on this machine (~15 minutes)
    python -m bench.routing --ray               # + the same requests through Ray Serve (needs ray[serve])

The trace: 32 conversations of 4 turns; each opens with one of 4 system prompts (~1.5k characters,
so conversations share prefixes too) and resends its whole history every turn, as chat clients do.

Simulated: each replica keeps the prompts of its 4 slots and 16 saved states (the model server's
prompt cache, least recently used out) and serves 4 requests at once; a request costs 2.5 ms a
prompt token it does not find cached and 20 ms a generated token. Reported per policy: the share of
prompt tokens served from cache, requests per replica, the busiest replica's busy time over the
mean, and time to first token.

Live: two model servers (`python -m backend`, 1 thread each: two replicas cannot beat one on 2
cores, so throughput is not the point) behind one API with BACKEND_URLS, once per policy; the
trace replayed by concurrent clients; `usage.prompt_tokens_details.cached_tokens` gives the hit rate.
Failover: the trace again while one model server is killed and restarted; requests that failed,
split into those in flight at the kill and the others. Overhead: time to first token of the same
short requests through the API over one model server and over two (the router's work), and the
routing decision's own cost. Ray Serve: the same requests through deployment/ray_serve.py's ingress.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.routing import Candidate, PrefixMemory, choose, prefix_keys

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a travel agency", "a bank's customer service", "a hospital's front desk", "an online bookshop"]


@dataclass
class Turn:
    conv: int
    turn: int
    at: float  # seconds after the start at which the client sends it (earliest)
    messages: list[dict]
    answer_tokens: int


def system_prompt(topic: str) -> str:
    rules = [f"Rule {i + 1}: when a customer of {topic} asks about item {i + 1}, answer politely, give the "
             f"reference number {1000 + 37 * i} and say that more details are on the website." for i in range(12)]
    return f"You are the assistant of {topic}. " + " ".join(rules)


def trace(conversations: int = 32, turns: int = 4, seed: int = 0) -> list[list[Turn]]:
    """Per conversation its turns; each turn's messages hold the whole history (answers are
    placeholders of the right length: the live replay puts in the real answers)."""
    rng = random.Random(seed)
    out = []
    for c in range(conversations):
        system = system_prompt(TOPICS[c % len(TOPICS)])
        start = rng.uniform(0, 20)
        history = [{"role": "system", "content": system}]
        conv = []
        for t in range(turns):
            history = history + [{"role": "user", "content": f"Customer {c}: question {t} about item {rng.randint(1, 12)}, "
                                                            f"please be specific about the options I have."}]
            conv.append(Turn(c, t, start + t * rng.uniform(4, 10), list(history), rng.randint(16, 48)))
            history = history + [{"role": "assistant", "content": "x" * (4 * conv[-1].answer_tokens)}]
        out.append(conv)
    return out


def flat_text(messages: list[dict]) -> str:
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)  # as app.routing.prompt_text


# --- simulation ------------------------------------------------------------------------------------
@dataclass
class SimReplica:
    name: str
    slots: int = 4
    saved: int = 16
    cache: list[list[bytes]] = field(default_factory=list)  # prompts' prefix keys, most recent last
    running: list[float] = field(default_factory=list)  # finish times
    queue: int = 0
    busy_s: float = 0.0
    requests: int = 0

    def hit_blocks(self, keys: list[bytes]) -> int:
        best = 0
        for cached in self.cache:
            n = 0
            for a, b in zip(keys, cached):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best

    def remember(self, keys: list[bytes]) -> None:
        self.cache = [k for k in self.cache if k != keys][-(self.slots + self.saved - 1):] + [keys]


def simulate(policy: str, convs: list[list[Turn]], replicas: int = 2, imbalance: int = 4) -> dict:
    reps = [SimReplica(f"r{i}") for i in range(replicas)]
    memory = {r.name: PrefixMemory() for r in reps}
    prompt_tokens = cached_tokens = 0
    ttft = []
    events = [(conv[0].at, c, 0) for c, conv in enumerate(convs)]
    heapq.heapify(events)
    turn_counter = 0
    while events:
        now, c, t = heapq.heappop(events)
        turn = convs[c][t]
        text = flat_text(turn.messages)
        keys = prefix_keys(text)
        for r in reps:
            r.running = [f for f in r.running if f > now]
        cands = [Candidate(r.name, len(r.running), memory[r.name].matched(keys)) for r in reps]
        name = choose(cands, imbalance, keys[0] if keys else b"", policy, turn_counter)
        turn_counter += 1
        rep = next(r for r in reps if r.name == name)
        memory[name].add(keys)
        tokens = len(text) // 4
        hit = min(tokens, rep.hit_blocks(keys) * 64 // 4)
        prompt_tokens += tokens
        cached_tokens += hit
        start = now if len(rep.running) < rep.slots else sorted(rep.running)[len(rep.running) - rep.slots]
        prefill = (tokens - hit) * 0.0025
        service = prefill + turn.answer_tokens * 0.020
        rep.running.append(start + service)
        rep.busy_s += service
        rep.requests += 1
        rep.remember(keys)
        ttft.append(start - now + prefill)
        if t + 1 < len(convs[c]):
            heapq.heappush(events, (max(convs[c][t + 1].at, start + service), c, t + 1))
    busy = [r.busy_s for r in reps]
    return {"policy": policy, "cache_hit_rate": round(cached_tokens / prompt_tokens, 4),
            "requests_per_replica": [r.requests for r in reps],
            "busiest_over_mean": round(max(busy) / statistics.mean(busy), 3),
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
            "ttft_p95_ms": round(sorted(ttft)[int(0.95 * (len(ttft) - 1))] * 1000, 1)}


# --- live ------------------------------------------------------------------------------------------
class Procs:
    def __init__(self, out: Path):
        self.out = out
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, env: dict) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, env={**os.environ, **env},
                             stdout=(self.out / f"{name}.log").open("a"), stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(name)
        p.send_signal(sig)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def backend_env(port: int, threads: int) -> dict:
    return {"BACKEND_PORT": str(port), "THREADS": str(threads), "N_PARALLEL": "4", "CTX_SIZE": "2048",
            "LOG_LEVEL": "warning", "SHUTDOWN_GRACE_S": "0"}


async def replay(base: str, model: str, convs: list[list[Turn]], speed: float = 4.0, max_tokens: int = 16,
                 on_result=None) -> list[dict]:
    """Each conversation as a client: its turns in order (real answers fed back), sent at the trace's
    times compressed `speed` times."""
    import httpx

    results = []
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0)) as client:
        async def conversation(conv: list[Turn]):
            answers: list[str] = []
            for turn in conv:
                wait = turn.at / speed - (time.monotonic() - t0)
                if wait > 0:
                    await asyncio.sleep(wait)
                msgs, a = [], iter(answers)
                for m in turn.messages:
                    msgs.append({**m, "content": next(a)} if m["role"] == "assistant" else m)
                sent = time.monotonic()
                rec = {"conv": turn.conv, "turn": turn.turn, "sent": sent - t0, "sent_at": sent}
                try:
                    r = await client.post("/v1/chat/completions", json={"model": model, "messages": msgs,
                                                                        "max_tokens": max_tokens, "temperature": 0})
                    rec["status"] = r.status_code
                    if r.status_code == 200:
                        body = r.json()
                        answers.append(body["choices"][0]["message"]["content"])
                        u = body["usage"]
                        rec.update(prompt_tokens=u["prompt_tokens"],
                                   cached_tokens=(u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
                    else:
                        answers.append("Sorry.")
                        rec["error"] = r.text[:200]
                except Exception as e:  # a connection cut: the request was lost
                    rec["status"] = None
                    rec["error"] = type(e).__name__
                    answers.append("Sorry.")
                rec["done_at"] = time.monotonic()
                rec["done"] = rec["done_at"] - t0
                results.append(rec)
                if on_result is not None:
                    on_result(rec)

        await asyncio.gather(*(conversation(c) for c in convs))
    return results


def hit_rate(results: list[dict]) -> float:
    ok = [r for r in results if r.get("status") == 200]
    return round(sum(r["cached_tokens"] for r in ok) / max(1, sum(r["prompt_tokens"] for r in ok)), 4)


def live(args, convs, out: Path) -> dict:
    import httpx

    from common.ports import free_port
    from common.wait_ready import wait_ready

    procs = Procs(out)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    rep: dict = {"policies": {}}
    try:
        for i, port in enumerate(ports):
            procs.start(f"model-server-{i}", "backend", backend_env(port, 1))
        for u in urls:
            problem = wait_ready(u, 240)
            if problem:
                raise RuntimeError(problem)

        def api(policy: str, backends: list[str]) -> str:
            port = free_port()
            procs.start(f"api-{policy}", "app", {"PORT": str(port), "HOST": "127.0.0.1", "BACKEND_URLS": ",".join(backends),
                                                  "ROUTER_POLICY": policy, "INFO_REFRESH_S": "1", "LOG_LEVEL": "warning"})
            base = f"http://127.0.0.1:{port}"
            problem = wait_ready(base, 60)
            if problem:
                raise RuntimeError(problem)
            return base

        model = None
        for policy in ("affinity", "round_robin"):
            base = api(policy, urls)
            model = model or httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
            before = [httpx.get(f"{u}/stats").json() for u in urls]
            print(f"replaying the trace, policy {policy} ...", file=sys.stderr)
            res = asyncio.run(replay(base, model, convs, args.speed))
            after = [httpx.get(f"{u}/stats").json() for u in urls]
            per = [a["tokens_generated"] - b["tokens_generated"] for a, b in zip(after, before)]
            rep["policies"][policy] = {"cache_hit_rate": hit_rate(res), "errors": sum(r["status"] != 200 for r in res),
                                       "tokens_generated_per_replica": per, "requests": len(res)}
            procs.stop(f"api-{policy}")
            # The next policy starts from cold caches too: every text changes from its first character on.
            convs = [[Turn(t.conv, t.turn, t.at, [{**m, "content": f"[{policy}] {m['content']}"} for m in t.messages],
                           t.answer_tokens) for t in c] for c in convs]

        # Failover: kill model server 1 a third into the replay, restart it two thirds in.
        base = api("affinity", urls)
        killed = {}

        async def failover():
            task = asyncio.create_task(replay(base, model, convs, args.speed))
            horizon = max(t.at for c in convs for t in c) / args.speed
            await asyncio.sleep(horizon / 3)
            killed["at"] = time.monotonic()
            procs.stop("model-server-1", signal.SIGKILL)
            print("killed model server 1", file=sys.stderr)
            await asyncio.sleep(horizon / 3)
            procs.start("model-server-1", "backend", backend_env(ports[1], 1))
            print("restarted model server 1", file=sys.stderr)
            return await task

        res = asyncio.run(failover())
        failed = [r for r in res if r.get("status") != 200]
        in_flight = [r for r in failed if r["sent_at"] <= killed["at"] <= r["done_at"]]
        rep["failover"] = {"requests": len(res), "failed": len(failed), "failed_in_flight_at_kill": len(in_flight),
                           "failed_not_in_flight": len(failed) - len(in_flight),
                           "failed_detail": [{k: r.get(k) for k in ("conv", "turn", "sent", "done", "status", "error")}
                                             for r in failed]}
        procs.stop("api-affinity")
        wait_ready(urls[1], 240)

        # Overhead: the same short requests, one at a time, through an API over one model server and over two.
        print("measuring routing overhead ...", file=sys.stderr)
        rep["overhead"] = overhead(api, urls, model, procs)
        return rep
    finally:
        procs.stop_all()


def ttft_ms(base: str, model: str, n: int = 30) -> list[float]:
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(n + 2):
            t0 = time.perf_counter()
            with client.stream("POST", "/v1/completions", json={"model": model, "prompt": f"Number {i % 3}: one, two,",
                                                               "max_tokens": 2, "temperature": 0, "stream": True}) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        out.append((time.perf_counter() - t0) * 1000)
                        break
                for _ in lines:  # the rest of the stream
                    pass
    return out[2:]  # the first two warm up


def overhead(api, urls, model, procs) -> dict:
    one = api("least_loaded", urls[:1])
    two = api("affinity", urls)
    rows = {"one model server": [], "two, routed": []}
    for _ in range(3):  # interleaved
        rows["one model server"] += ttft_ms(one, model, 10)
        rows["two, routed"] += ttft_ms(two, model, 10)
    procs.stop("api-least_loaded")
    procs.stop("api-affinity")
    med = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    return {"ttft_p50_ms": med, "difference_ms": round(med["two, routed"] - med["one model server"], 2),
            "decision_us": decision_cost_us()}


def decision_cost_us(n: int = 2000) -> float:
    """One routing decision over 2 replicas that remember 1,000 conversations' prefixes."""
    from app.routing import prompt_text  # noqa: F401

    mem = [PrefixMemory(), PrefixMemory()]
    texts = [flat_text(t.messages) for c in trace(250, 4, seed=1) for t in c]
    for i, text in enumerate(texts):
        mem[i % 2].add(prefix_keys(text))
    t0 = time.perf_counter()
    for i in range(n):
        keys = prefix_keys(texts[i % len(texts)])
        choose([Candidate("a", 1, mem[0].matched(keys)), Candidate("b", 2, mem[1].matched(keys))], 4, keys[0])
    return round((time.perf_counter() - t0) / n * 1e6, 1)


def ray_part(args, out: Path) -> dict:
    """TTFT of the same short requests through Ray Serve's ingress (two replicas) and our API over the
    same two model servers' kind (run apart: the machine has two cores)."""
    import ray
    from ray import serve

    from common.ports import free_port
    from deployment.ray_serve import build

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(replicas=2, threads=1, backend={"ctx_size": 2048, "log_level": "warning"}),
                  name="llm-serve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            h = httpx.get(f"{base}/health", timeout=10)
            if h.status_code == 200 and sum(r["status"] == "ok" for r in h.json()["replicas"]) == 2:
                break
            time.sleep(1)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        samples = ttft_ms(base, model, 30)
        return {"ttft_p50_ms": round(statistics.median(samples), 2)}
    finally:
        serve.shutdown()
        ray.shutdown()


def markdown(rep: dict) -> str:
    lines = ["### Routing: 32 conversations x 4 turns over 2 model servers", "", "Simulated (app/routing.py on the trace):", "",
             "| policy | prompt tokens from cache | requests per replica | busiest / mean busy time | TTFT p50 ms | TTFT p95 ms |",
             "|---|---|---|---|---|---|"]
    for r in rep["simulated"]:
        lines.append(f"| {r['policy']} | {r['cache_hit_rate']:.1%} | {r['requests_per_replica']} | {r['busiest_over_mean']} | "
                     f"{r['ttft_p50_ms']} | {r['ttft_p95_ms']} |")
    lv = rep.get("live")
    if lv:
        lines += ["", "Live (two model servers, 1 thread each, API with BACKEND_URLS):", "",
                  "| policy | prompt tokens from cache | tokens generated per replica | errors |", "|---|---|---|---|"]
        for name, r in lv["policies"].items():
            lines.append(f"| {name} | {r['cache_hit_rate']:.1%} | {r['tokens_generated_per_replica']} | {r['errors']}/{r['requests']} |")
        f = lv["failover"]
        lines += ["", f"Failover (model server 1 killed a third into the replay, restarted at two thirds): "
                  f"{f['failed']} of {f['requests']} requests failed, {f['failed_in_flight_at_kill']} of them in flight on "
                  f"the killed server, {f['failed_not_in_flight']} not in flight."]
        o = lv["overhead"]
        lines += [f"Routing overhead: TTFT p50 {o['ttft_p50_ms']} ms (difference {o['difference_ms']} ms); "
                  f"one routing decision {o['decision_us']} us."]
    if rep.get("ray"):
        lines.append(f"Ray Serve ingress, two replicas: TTFT p50 {rep['ray']['ttft_p50_ms']} ms.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate-only", action="store_true")
    ap.add_argument("--ray", action="store_true", help="also measure the Ray Serve path")
    ap.add_argument("--speed", type=float, default=4.0, help="the trace's clock runs this many times faster live")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    convs = trace()
    rep = {"simulated": [simulate(p, convs) for p in ("affinity", "least_loaded", "round_robin")]}

    def write() -> None:  # after each part: a failing later part keeps the earlier figures
        (out / "routing.json").write_text(json.dumps(rep, indent=2) + "\n")
        (out / "routing.md").write_text(markdown(rep))

    if not args.simulate_only:
        rep["live"] = live(args, convs, out)
        write()
        if args.ray:
            rep["ray"] = ray_part(args, out)
    write()
    print(markdown(rep))


if __name__ == "__main__":
    main()
