"""What PROMPT_CACHE_ANSWERS=reuse costs where it cannot pay: a chat prompt whose earlier answers are not
in the cache (a new server, an evicted or edited conversation), prefilled cold, in-process.

    python -m bench.cold_history            # ~2 minutes

A conversation of three user turns, each answered with a passage of ~300 tokens (written here, not
generated), then a fourth question; its time to first token on a server with the prompt cache
emptied before each try, under `reuse` (answers in decode-sized chunks) and `recompute` (answers in
long chunks), alternating, in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench.mixed_prompts import PASSAGES
from common.protocol import ChatMessage, GenerationRequest


def conversation() -> list[ChatMessage]:
    passages = [p for p, _ in PASSAGES]
    msgs = [ChatMessage(role="system", content="You answer questions about the user's documents.\n\n" + passages[0])]
    for k, q in enumerate(["What is this about?", "Tell me more.", "What else does it say?"]):
        msgs.append(ChatMessage(role="user", content=q))
        msgs.append(ChatMessage(role="assistant", content=" " + " ".join(passages[1 + k:4 + k])))
    msgs.append(ChatMessage(role="user", content="Summarise it in one sentence."))
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from backend.config import BackendSettings
    from backend.local import run_requests
    from backend.runtime import ModelService

    services = {}
    for mode in ("reuse", "recompute"):
        services[mode] = ModelService(BackendSettings(model=args.model, threads=args.threads, n_parallel=1, ctx_size=4096,
                                                      log_level="warning", medusa_heads="none", prompt_lookup="off",
                                                      parked_seqs=0, prompt_cache_ram_mb=0, prompt_cache_answers=mode))
        services[mode].load()
    req = GenerationRequest(id="h", messages=conversation(), temperature=0, max_tokens=1)
    prep = services["reuse"].prepare_one(req)
    answer_tokens = sum(b - a for a, b in prep.spans)
    ttft = {mode: [] for mode in services}
    for r in range(args.rounds):
        for mode, service in services.items():
            service.engine.call(lambda m: None)  # between steps: the free slot forgets its cells
            t0 = time.perf_counter()
            res = run_requests(service, [req.model_copy(update={"id": f"{mode}-{r}"})])[f"{mode}-{r}"]
            assert res.prompt.cached_tokens == 0, res.prompt
            ttft[mode].append(round((res.choices[0].token_times[0] - t0) * 1000))
    for service in services.values():
        service.close()
    out = {"prompt_tokens": len(prep.tokens), "answer_tokens": answer_tokens, "ttft_ms": ttft,
           "ratio_reuse_over_recompute": round(statistics.mean(ttft["reuse"]) / statistics.mean(ttft["recompute"]), 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
