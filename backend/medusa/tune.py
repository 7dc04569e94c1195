"""Tune Medusa to this machine and model: which draft length pays, and under how many streams.

    python -m backend.medusa.tune --model M.gguf --heads heads.safetensors --out tree.json

1. The verify cost curve: the time of one llama_decode of k tokens of one sequence (k = 1..64), and
   of one token from each of S sequences (S = 1..n_parallel), on this machine.
2. Per-head acceptance on a prompt set: greedy generation with the full top-1 draft, counting at
   each depth how often the draft token is confirmed given every depth before it was.
3. Expected tokens per step of a draft of length L: E(L) = 1 + sum_{d<=L} prod_{j<d} a_j. The best L
   maximises E(L) / cost(L + 1); it must beat plain decoding's 1 / cost(1) or Medusa stays off, and
   speculation continues only while S streams gain from it (E / cost(L+1) > S / cost_S: each
   speculating sequence verifies in its own decode).

The JSON it writes is what MEDUSA_TREE takes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from backend.config import BackendSettings
from backend.llama_model import ContextConfig, LlamaModel
from backend.local import run_requests
from backend.spec.heads import load_heads
from backend.medusa.planning import plan
from backend.spec.costs import COST_KS, measure_costs
from backend.medusa.train import PROMPTS_FILE
from backend.spec.tree import chain
from backend.model_files import resolve_model
from backend.runtime import ModelService
from common.protocol import GenerationRequest

log = logging.getLogger("backend.medusa.tune")

# The tuning's default prompt set: the first of the repo's prompt openers (a held-out set is better:
# training writes one, held_out_prompts.txt, next to the heads).
PROMPTS = [line for line in PROMPTS_FILE.read_text().splitlines() if line.strip()][:12]


def measure_acceptance(settings: BackendSettings, prompts: list[str], max_tokens: int) -> list[float]:
    service = ModelService(settings)
    service.load()
    if service.error:
        raise RuntimeError(service.error)
    try:
        for i, p in enumerate(prompts):  # one at a time: speculation is on for a single stream
            run_requests(service, [GenerationRequest(id=f"tune-{i}", prompt=p, max_tokens=max_tokens, temperature=0.0)])
        return [a or 0.0 for a in service.speculator.stats.as_dict()["per_head_acceptance"]]
    finally:
        service.engine.shutdown()
        service.model.close()


def tune(path: Path, heads: Path, out: Path, prompts: list[str] | None = None, max_tokens: int = 96,
         reps: int = 7, max_k: int = 64, threads: int = 0, n_parallel: int = 4) -> dict:
    """Measure, plan, and write the tuning JSON that MEDUSA_TREE takes; returns it."""
    model = LlamaModel(path, ContextConfig(0, n_parallel, threads, 512, False, embeddings=True))
    n_heads = load_heads(heads, model.n_embd, model.n_vocab).n_heads
    chain_cost, batch_cost = measure_costs(model, [k for k in COST_KS if k <= max_k], reps)
    model.close()
    log.info("cost ms: %s; %d streams: %s", chain_cost, n_parallel, batch_cost)
    settings = BackendSettings(
        model=str(path), medusa_heads=str(heads), medusa_tree=json.dumps(chain(n_heads)), medusa_max_streams=1,
        threads=threads, n_parallel=n_parallel,
    )
    acceptance = measure_acceptance(settings, [p for p in (prompts or PROMPTS) if p.strip()], max_tokens)
    result = plan(acceptance, chain_cost, batch_cost) | {"model": path.name, "heads": str(heads)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s: %s", out, {k: result[k] for k in ("enabled", "choices") if k in result})
    if not result["enabled"]:
        log.warning("medusa stays off: %s", result["reason"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="GGUF path or 'default'")
    ap.add_argument("--heads", required=True, help="Medusa head checkpoint")
    ap.add_argument("--out", required=True, help="where to write the tuning JSON (MEDUSA_TREE)")
    ap.add_argument("--prompts", help="a file of prompts, one per line (default: a built-in set)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--max-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--n-parallel", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else None
    tune(resolve_model(args.model, None), Path(args.heads), Path(args.out), prompts, args.max_tokens, args.reps,
         args.max_k, args.threads, args.n_parallel)


if __name__ == "__main__":
    main()
