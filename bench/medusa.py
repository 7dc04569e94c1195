"""Medusa against plain decoding, same prompts, same run; and the projected Vicuna-7B Q8_0 speedup.

    python -m bench.medusa [--heads H.safetensors] [--tree tree.json]   # bench/results/medusa.{json,md}

Part 1, the default model in-process (bench.inprocess.interleaved_levels, greedy, ignore_eos): plain,
Medusa with the tuned draft and Medusa with the untuned full draft at 1 and 4 streams, every round
sent through each in turn (tokens/s ratios, tokens per speculative step). Without --tree it runs the
tuning command's function first; without --heads it makes heads from the base model's own output
projection (backend.medusa.init_heads); prompts: the heads' held_out_prompts.txt when there is one.

Part 2, a 7B-shaped Q8_0 GGUF with random weights (bench/synthetic_gguf.py; timing does not depend on
weight values): its verify cost curve on this machine, combined with the published Vicuna-7B Medusa-1
figures, gives the projected speedup of Vicuna-7B Q8_0 on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from backend.medusa.planning import expected_tokens
from backend.spec.tree import chain
from bench.inprocess import interleaved_levels
from bench.loadgen import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
# Published Medusa-1 figures for vicuna-7b-v1.3 (Cai et al. 2024): per-head top-1 accuracy during
# training, and mean tokens per step with the 64-node tree on an A100.
VICUNA_HEAD_TOP1 = [0.56, 0.32, 0.20, 0.15]
VICUNA_TREE64_TOKENS = 2.57
PAPER_SPEEDUP_A100 = 2.18
SEED_PROJECTION = 1.25


def chain_tokens(acc: list[float], length: int, nested: bool) -> float:
    """Expected tokens per step of a top-1 draft of `length`, from unconditional per-head accuracy:
    nested (a head is right only where all before it are: the optimistic bound) or independent."""
    return 1.0 + sum(acc[:length]) if nested else expected_tokens(acc, length)


def projection(cost: dict[int, float]) -> dict:
    rows = []
    for length in range(1, len(VICUNA_HEAD_TOP1) + 1):
        if length + 1 not in cost:
            continue
        for nested in (False, True):
            e = chain_tokens(VICUNA_HEAD_TOP1, length, nested)
            rows.append(dict(draft=length, bound="nested" if nested else "independent", tokens_per_step=round(e, 3),
                             speedup=round(e * cost[1] / cost[length + 1], 3)))
    best = {b: max((r for r in rows if r["bound"] == b), key=lambda r: r["speedup"]) for b in ("independent", "nested")}
    tree64 = round(VICUNA_TREE64_TOKENS * cost[1] / cost[64], 3) if 64 in cost else None
    return dict(rows=rows, best=best, tree64_speedup=tree64)


def default_model_part(args) -> dict:
    from backend.config import BackendSettings
    from backend.local import run_requests
    from backend.medusa.init_heads import base_initialised_heads
    from backend.medusa.tune import PROMPTS as TUNE_PROMPTS
    from backend.medusa.tune import tune
    from backend.model_files import resolve_model
    from backend.runtime import ModelService
    from common.protocol import GenerationRequest

    path = resolve_model(args.model, None)
    base = dict(model=str(path), ctx_size=1024, n_parallel=4, threads=args.threads, medusa_heads="none")
    levels = [1, 4]

    def load(**kw) -> ModelService:
        service = ModelService(BackendSettings(**{**base, **kw}))
        service.load()
        if service.error:
            raise RuntimeError(service.error)
        return service

    plain = load()
    heads = args.heads
    if not heads:
        seed_prompts = PROMPTS + TUNE_PROMPTS
        outs = run_requests(plain, [GenerationRequest(id=f"h{i}", prompt=p, max_tokens=args.max_tokens, temperature=0)
                                    for i, p in enumerate(seed_prompts)])
        used = {t for r in outs.values() for t in r.choices[0].token_ids} | set(range(4096))
        heads = str(Path(tempfile.mkdtemp()) / "base-initialised-heads.safetensors")
        base_initialised_heads(path, 3, np.array(sorted(used))).save(Path(heads))
    shipped = Path(heads).parent / "held_out_prompts.txt"
    prompts_file = args.prompts or (str(shipped) if shipped.exists() else "")
    prompts = [p for p in Path(prompts_file).read_text().splitlines() if p.strip()] if prompts_file else PROMPTS
    tree = args.tree
    tuning = None
    if tree and Path(tree).is_file() and tree.endswith(".json"):
        tuning = json.loads(Path(tree).read_text())  # a tuning command's result, reused
    if not tree:  # the tuning command's own function, on the same prompts
        tree = str(Path(tempfile.mkdtemp()) / "tree.json")
        tuning = tune(path, Path(heads), Path(tree), prompts=prompts, max_tokens=args.max_tokens, reps=5, max_k=8,
                      threads=args.threads, n_parallel=4)
    n_heads = len(json.loads(Path(tree).read_text()).get("acceptance", [])) or 3
    forced_tree = json.dumps(chain(n_heads))
    services = {"plain": plain, "tuned": load(medusa_heads=heads, medusa_tree=tree),
                "forced": load(medusa_heads=heads, medusa_tree=forced_tree)}
    try:
        rows = interleaved_levels(services, levels, args.max_tokens, args.rounds, prompts)
        stats = {name: (s.speculator.stats.as_dict() if s.speculator else {}) for name, s in services.items()}
        tuned_state = "on" if services["tuned"].speculator else "off"
    finally:
        for service in services.values():
            service.engine.shutdown()
            service.model.close()
    plain_rows, tuned_rows, forced_rows = rows["plain"], rows["tuned"], rows["forced"]
    tuned_stats, forced_stats = stats["tuned"], stats["forced"]
    return dict(model=path.name, heads=heads, prompts=prompts_file or "bench.loadgen.PROMPTS", tree=tree, tuning=tuning,
                plain=plain_rows,
                tuned=tuned_rows, tuned_state=tuned_state, tuned_stats=tuned_stats,
                forced=forced_rows, forced_tree=forced_tree, forced_stats=forced_stats,
                ratios={f"{name} / plain, {c} stream{'s' if c > 1 else ''}": got[i][key] / plain_rows[i][key]
                        for name, got in (("tuned", tuned_rows), ("forced", forced_rows))
                        for i, (c, key) in enumerate(((1, "stream_tok_s"), (4, "aggregate_tok_s")))})


def big_model_part(args) -> dict:
    from backend.llama_model import ContextConfig, LlamaModel
    from backend.spec.costs import measure_costs
    from bench.synthetic_gguf import VICUNA_7B, write_llama_gguf

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "synthetic-vicuna-7b-shape-q8_0.gguf"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        write_llama_gguf(tmp, VICUNA_7B)
        tmp.rename(path)
    model = LlamaModel(path, ContextConfig(256, 4, args.threads, 512, False))
    ks = [1, 2, 3, 4, 5, 6, 8, 16, 32, 64] if not args.quick else [1, 2, 3]
    cost, batch = measure_costs(model, ks, reps=args.big_reps, prompt=list(range(300, 340)))
    model.close()
    return dict(model=path.name, cost_ms=cost, batch_cost_ms=batch, projection=projection(cost))


def markdown(rep: dict) -> str:
    lines = []
    d = rep.get("default")
    if d:
        t = d["tuning"] or {}
        lines += [f"### Default model ({d['model']}), in-process, greedy, {rep['max_tokens']} tokens", "",
                  f"Heads: {d['heads']}; prompts: {d['prompts']}.", "",
                  "| decoding | streams | tok/s per stream | aggregate tok/s |", "|---|---|---|---|"]
        for name, label in (("plain", "plain"), ("tuned", f"Medusa, tuned (speculation {d['tuned_state']})"),
                            ("forced", f"Medusa, untuned draft {d['forced_tree']}")):
            for r in d[name]:
                lines.append(f"| {label} | {r['concurrency']} | {r['stream_tok_s']:.1f} | {r['aggregate_tok_s']:.1f} |")
        lines += [""] + [f"- {k}: {v:.3f}" for k, v in d["ratios"].items()]
        for name in ("tuned", "forced"):
            st = d[f"{name}_stats"]
            if st:
                lines.append(f"- {name} draft: mean tokens per speculative step {st.get('mean_tokens_per_step')}, "
                             f"per-head acceptance {st.get('per_head_acceptance')}, "
                             f"{st.get('speculative_steps')} speculative steps")
        if t:
            lines.append("- decode cost on this machine, ms (k tokens of one sequence): "
                         + ", ".join(f"k={k} {v}" for k, v in t["cost_ms"].items()))
            lines.append(f"- tuning (backend.medusa.tune): acceptance {t['acceptance']}; "
                         + (f"draft {t['choices']}, up to {t['max_streams']} streams, expected "
                            f"{t['expected_speedup_one_stream']}x" if t["enabled"] else f"off: {t['reason']}"))
        lines.append("")
    b = rep.get("big")
    if b:
        lines += [f"### Vicuna-7B shape, Q8_0, random weights ({b['model']})", "",
                  "| k | " + " | ".join(str(k) for k in b["cost_ms"]) + " |",
                  "|---|" + "---|" * len(b["cost_ms"]),
                  "| ms | " + " | ".join(f"{v:.0f}" for v in b["cost_ms"].values()) + " |", "",
                  "| draft (top-1 path) | acceptance model | tokens/step | projected speedup |", "|---|---|---|---|"]
        for r in b["projection"]["rows"]:
            lines.append(f"| {r['draft']} | {r['bound']} | {r['tokens_per_step']} | {r['speedup']}x |")
        p = b["projection"]
        lines += ["", f"- best draft: {p['best']['independent']['speedup']}x (independent heads) to "
                  f"{p['best']['nested']['speedup']}x (nested); the paper's 64-node tree (2.57 tokens/step) "
                  f"would give {p['tree64_speedup']}x here; the paper: {PAPER_SPEEDUP_A100}x on an A100; the seed's "
                  f"projection: {SEED_PROJECTION}x.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", default="", help="head checkpoint (default: base-initialised heads made here)")
    ap.add_argument("--tree", default="", help="MEDUSA_TREE (default: tune here, with the tuning command's function)")
    ap.add_argument("--prompts", default="", help="prompt file (default: the heads' held_out_prompts.txt, if any)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=12, help="rounds at each level (a round: one request per stream)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--big-reps", type=int, default=3)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "llm-serve" / "bench"))
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    rep = {"max_tokens": args.max_tokens}
    if not args.skip_default:
        rep["default"] = default_model_part(args)
    if not args.skip_big:
        rep["big"] = big_model_part(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "medusa.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out / "medusa.md").write_text(markdown(rep))
    print(markdown(rep))


if __name__ == "__main__":
    main()
