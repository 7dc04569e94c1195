"""Our stack at two revisions, side by side in one run: did a change cost decode speed or TTFT?

Checks each revision out into a scratch worktree (`git worktree add`; `WORKTREE` means the working
tree as it is), starts its model server and API on free ports with the same settings, drives it with
bench/loadgen.py (streaming greedy completions, `ignore_eos`), and alternates A, B, A, B, ... for
`--repeats` rounds so that a machine that speeds up or slows down during the run touches both alike.
Reports per level the median over repeats of TTFT p50, stream tok/s and aggregate tok/s, and B / A.

    python -m bench.ab --a 40618c4 --b WORKTREE                 # 1, 4 and 8 streams, 3 repeats
    python -m bench.ab --a HEAD~1 --b HEAD --concurrency 1 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.compare import ROOT, Proc, wait_openai
from bench.loadgen import level_dict, sweep
from common.ports import free_port
from common.wait_ready import wait_ready


def checkout(rev: str, scratch: Path) -> Path:
    if rev == "WORKTREE":
        return ROOT
    dest = scratch / rev.replace("/", "_").replace("~", "-")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(dest), rev], check=True,
                   capture_output=True)
    return dest


def run_stack(tree: Path, args, log_dir: Path, tag: str) -> list[dict]:
    bport, aport = free_port(), free_port()
    env = {"BACKEND_PORT": str(bport), "PORT": str(aport), "THREADS": str(args.threads), "N_PARALLEL": str(max(args.levels)),
           "LOG_LEVEL": "warning", "BACKEND_URL": f"http://127.0.0.1:{bport}", "PYTHONPATH": str(tree)}
    backend = Proc([sys.executable, "-m", "backend"], log_dir / f"{tag}-backend.log", env, cwd=tree)
    api = None
    try:
        problem = wait_ready(f"http://127.0.0.1:{bport}", timeout_s=180)
        if problem:
            raise RuntimeError(f"{tag}: {problem}")
        api = Proc([sys.executable, "-m", "app"], log_dir / f"{tag}-api.log", env, cwd=tree)
        base = f"http://127.0.0.1:{aport}"
        wait_openai(base)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        return [level_dict(x) for x in asyncio.run(sweep(f"{base}/v1", "completions", model, args.levels, args.max_tokens, args.rounds))]
    finally:
        for p in (api, backend):
            if p is not None:
                p.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="git revision (or WORKTREE)")
    p.add_argument("--b", default="WORKTREE", help="git revision (or WORKTREE)")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="requests per stream at each level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args()
    a.levels = [int(x) for x in a.concurrency.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    trees = {"A": checkout(a.a, scratch), "B": checkout(a.b, scratch)}
    runs: dict[str, list[list[dict]]] = {"A": [], "B": []}
    try:
        for r in range(a.repeats):
            for tag in ("A", "B"):
                print(f"repeat {r + 1}/{a.repeats}: {tag} ({getattr(a, tag.lower())}) ...", file=sys.stderr)
                runs[tag].append(run_stack(trees[tag], a, out, f"ab-{tag}"))
    finally:
        for tag, tree in trees.items():
            if tree != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    lines = [f"A = `{a.a}`, B = `{a.b}`; completions, greedy streaming, {a.max_tokens} tokens, {a.rounds} requests per "
             f"stream, {a.threads} threads, N_PARALLEL={max(a.levels)}; medians over {a.repeats} interleaved repeats.", "",
             "| streams | TTFT p50 ms A | B | tok/s per stream A | B | B/A | aggregate tok/s A | B | B/A |",
             "|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for i, level in enumerate(a.levels):
        med = {tag: {k: statistics.median(run[i][k] for run in runs[tag]) for k in ("ttft_p50_ms", "stream_tok_s", "aggregate_tok_s")}
               for tag in ("A", "B")}
        summary.append({"streams": level, **{f"{k}_{t}": round(v, 2) for t in med for k, v in med[t].items()}})
        A, B = med["A"], med["B"]
        lines.append(f"| {level} | {A['ttft_p50_ms']:.1f} | {B['ttft_p50_ms']:.1f} | {A['stream_tok_s']:.1f} | "
                     f"{B['stream_tok_s']:.1f} | {B['stream_tok_s'] / A['stream_tok_s']:.3f} | {A['aggregate_tok_s']:.1f} | "
                     f"{B['aggregate_tok_s']:.1f} | {B['aggregate_tok_s'] / A['aggregate_tok_s']:.3f} |")
    md = "\n".join(lines) + "\n"
    (out / "ab.json").write_text(json.dumps({"a": a.a, "b": a.b, "summary": summary, "runs": runs}, indent=1))
    (out / "ab.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
