"""Where a decode step's time goes: inside llama_decode, and outside it (scheduling, sampling,
drafting, handing events over), on the mixed prompt set, in-process (no HTTP), at one stream.

    python -m bench.step_time                       # plain, as shipped, EXACTNESS=fast; ~4 minutes
    python -m bench.step_time --configs "ours fast (EXACTNESS=fast)" --profile 15

Per configuration: engine steps, tokens, and per step the wall time, the llama_decode time, the time
outside it and (with Medusa) the heads' share of that; the host's share of all step time. With
--profile N, cProfile runs on the engine thread and the N functions with the most time of their own
are listed (llama_decode shows as one of them), so what the host spends shows by name.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path

from bench.speculation import OURS, rendered
from common.protocol import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ["ours plain", "ours Medusa + lookup", "ours fast (EXACTNESS=fast)"]


def settings_for(env: dict, model: Path, threads: int):
    from backend.config import BackendSettings

    fields = {k.lower(): v for k, v in env.items()}
    return BackendSettings(model=str(model), threads=threads, n_parallel=4, log_level="warning", **fields)


def run_config(name: str, args, items: list[dict]) -> dict:
    from backend.engine import Engine
    from backend.local import run_requests
    from backend.runtime import ModelService

    prof = cProfile.Profile() if args.profile else None
    if prof is not None:  # the engine thread runs _loop: profile it there (cProfile sees one thread)
        original = Engine._loop
        Engine._loop = lambda self: prof.runcall(original, self)
    try:
        with ModelService(settings_for(OURS[name], args.model_path, args.threads)) as service:
            warm = [GenerationRequest(id=f"warm-{i}", prompt=p["prompt"], max_tokens=8, temperature=0) for i, p in enumerate(items[:2])]
            for r in warm:
                run_requests(service, [r])
            st0, t0 = service.stats(), time.perf_counter()
            tokens = 0
            for i, p in enumerate(items):  # one stream: each prompt alone, back to back
                r = GenerationRequest(id=f"{i}", prompt=p["prompt"], stop=p["stop"], max_tokens=args.max_tokens, temperature=0)
                res = run_requests(service, [r])[r.id]
                tokens += res.choices[0].completion_tokens
            wall = time.perf_counter() - t0
            st1 = service.stats()
            heads = (st1.speculation or {}).get("heads") or {}
    finally:
        if prof is not None:
            Engine._loop = original
    steps = st1.steps - st0.steps
    decode = st1.decode_seconds - st0.decode_seconds
    step = st1.step_seconds - st0.step_seconds
    out = {
        "config": name, "prompts": len(items), "tokens": tokens, "wall_s": round(wall, 3), "steps": steps,
        "tokens_per_s": round(tokens / wall, 2),
        "step_ms": round(step * 1000 / steps, 3), "decode_ms": round(decode * 1000 / steps, 3),
        "outside_decode_ms": round((step - decode) * 1000 / steps, 3),
        "outside_share": round((step - decode) / step, 4),
        # heads: mean per call over the whole service life (warm-up included), a close enough share
        "heads_ms_per_call": heads.get("mean_ms"),
    }
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
        out["profile"] = buf.getvalue()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", type=lambda v: v.split(","), default=DEFAULT_CONFIGS, help=f"of {', '.join(OURS)}")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile the engine thread; list N functions")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    from backend.model_files import resolve_model

    args.model_path = resolve_model(args.model)
    items = rendered(args.model_path)
    rows = []
    for name in args.configs:
        row = run_config(name, args, items)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}))
        if "profile" in row:
            print(row["profile"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
