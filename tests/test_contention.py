"""Load under CPU contention (bench/contention.py, bounded): while busy processes take every core, the API
answers only 200 or 429 and every stream ends in `data: [DONE]`; a 503 would have to come from the model
server itself, and it is up.

Some prompts hold line separators (U+2028, U+0085) and are echoed, and the model continues them in kind:
such text once cut the model server's NDJSON events in two in the API layer (httpx's aiter_lines splits
like str.splitlines), failing each batch it was in with a 503 (four at a time, one per request batched).
"""

from __future__ import annotations

import asyncio

import pytest

from bench.contention import ALLOWED, SEPARATED, CpuHog, run_load, summarize
from bench.loadgen import PROMPTS

pytestmark = pytest.mark.timeout(300)

CLIENTS = 16
DURATION_S = 12.0
MAX_TOKENS = 8


def test_under_cpu_contention_only_200_and_429_and_complete_streams(live_stack):
    prompts = PROMPTS[:4] + SEPARATED
    with CpuHog(processes=2, max_s=240):
        outcomes = asyncio.run(run_load(live_stack.base_url, live_stack.model, CLIENTS, DURATION_S, MAX_TOKENS,
                                        timeout_s=200, prompts=prompts, extra={"echo": True}))
    rep = summarize(outcomes, CLIENTS, DURATION_S, MAX_TOKENS, 2)
    assert rep.statuses.get("200", 0) >= CLIENTS, rep  # the load ran: every client got answers
    assert set(rep.statuses) <= {str(s) for s in ALLOWED}, rep
    assert rep.incomplete_streams == 0 and any(o.stream and o.status == 200 for o in outcomes), rep
    assert rep.ok, rep
