"""Which drafts a step verifies: the arithmetic of speculation as pure functions, tested without a model.

Every decoding sequence may have drafts from several sources (Medusa's heads, prompt lookup, the
tokens a grammar forces). A draft of length L is verified in the sequence's own llama_decode of L + 1
rows, costing chain(L + 1); every sequence that does not verify shares one decode of a token each,
costing batch(m) for m sequences. A draft yields E(L) = 1 + sum_{d<L} prod_{j<=d} a_j tokens in
expectation, a_j the conditional acceptance at depth j (given all before it were accepted). The
step maximises tokens per millisecond over the whole step:

    (sum over verifying sequences of E_i  +  m)  /  (sum of chain(L_i + 1)  +  batch(m))

so a sequence verifies only where its draft pays for its own decode, on this machine, at this load:
on a small model a verify decode costs about what a shared step of four costs, so speculation pays
under load only for drafts that are nearly sure (prompt lookup in a RAG answer); on a 7B model a
2-4 row verify costs about one row, and it pays for every stream.

Acceptance is estimated from what each source's drafts would have yielded, judged against the tokens
the sequence really produced next, whether or not the draft was verified (the "shadow" judgement:
free, and it keeps every source's figure current even while the plan does not use it). A sequence's
own record counts most; the server-wide record of the source is its prior.

Costs start from a measurement at load (backend/spec/costs.measure_costs) and follow the decodes
the engine really runs (an exponential moving average per row count), so a busy machine or a long
context moves the plan with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PRIOR_WEIGHT = 4.0  # pseudo-judgements the server-wide figure counts for in a sequence's estimate
DEFAULT_ACCEPTANCE = 0.5  # before a source has ever been judged
COST_EWMA = 0.05  # weight of a new timing in the cost tables


@dataclass
class DepthCounts:
    """Judged and accepted draft tokens per depth (depth d is judged only if all before it matched)."""

    judged: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def add(self, depth_judged: int, depth_accepted: int) -> None:
        need = depth_judged - len(self.judged)
        if need > 0:
            self.judged += [0] * need
            self.accepted += [0] * need
        for d in range(depth_judged):
            self.judged[d] += 1
            self.accepted[d] += d < depth_accepted

    def rate(self, d: int) -> float | None:
        return self.accepted[d] / self.judged[d] if d < len(self.judged) and self.judged[d] else None

    def as_list(self) -> list[float | None]:
        return [round(a / j, 4) if j else None for a, j in zip(self.accepted, self.judged)]


def judge(draft: Sequence[int], actual: Sequence[int]) -> tuple[int, int] | None:
    """(depths judged, depths accepted) of a draft against the tokens that really followed, or None
    while too few have followed to tell (no mismatch yet and the draft is longer than them)."""
    for d, tok in enumerate(draft):
        if d >= len(actual):
            return None
        if actual[d] != tok:
            return d + 1, d
    return len(draft), len(draft)


def blended(own: DepthCounts | None, prior: DepthCounts | None, depth: int,
            default: float = DEFAULT_ACCEPTANCE) -> float:
    """Acceptance at `depth`: the sequence's own record, with the server-wide one as a prior worth
    PRIOR_WEIGHT judgements (and `default` before anything was judged)."""
    p = prior.rate(depth) if prior is not None else None
    p = default if p is None else p
    if own is None or depth >= len(own.judged):
        return p
    return (own.accepted[depth] + PRIOR_WEIGHT * p) / (own.judged[depth] + PRIOR_WEIGHT)


def expected_tokens(acceptance: Sequence[float], length: int) -> float:
    """E(L) = 1 + sum_{d<L} prod_{j<=d} a_j: tokens a verify of the first L draft tokens yields."""
    e, p = 1.0, 1.0
    for a in acceptance[:length]:
        p *= a
        e += p
    return e


class CostTable:
    """Milliseconds of one decode by size (rows of one sequence, or sequences of one token each):
    measured values, updated by a moving average; sizes never seen interpolate or extrapolate."""

    def __init__(self, measured: dict[int, float]):
        if not measured:
            raise ValueError("a cost table needs at least one measurement")
        self.ms = {int(k): float(v) for k, v in measured.items()}

    def observe(self, size: int, ms: float) -> None:
        old = self.ms.get(size)
        self.ms[size] = ms if old is None else old + COST_EWMA * (ms - old)

    def __call__(self, size: int) -> float:
        if size <= 0:
            return 0.0
        if size in self.ms:
            return self.ms[size]
        keys = sorted(self.ms)
        lo = max((k for k in keys if k < size), default=None)
        hi = min((k for k in keys if k > size), default=None)
        if lo is None:
            return self.ms[hi] * size / hi
        if hi is None:  # beyond the largest: the slope of the last two points, or proportional
            if len(keys) >= 2:
                a, b = keys[-2], keys[-1]
                return self.ms[b] + (self.ms[b] - self.ms[a]) / (b - a) * (size - b)
            return self.ms[lo] * size / lo
        return self.ms[lo] + (self.ms[hi] - self.ms[lo]) * (size - lo) / (hi - lo)

    def as_dict(self) -> dict[str, float]:
        return {str(k): round(v, 2) for k, v in sorted(self.ms.items())}


@dataclass(frozen=True)
class Option:
    """A draft one source offers for one sequence, with its acceptance per depth."""

    source: str
    draft: tuple[int, ...]
    acceptance: tuple[float, ...]

    def best_length(self, rate: float, chain: CostTable) -> tuple[float, int]:
        """The length maximising E(L) - rate * chain(L + 1) (tokens won beyond what the time would
        give at `rate` tokens/ms), and that gain."""
        best, best_len = float("-inf"), 0
        for length in range(1, len(self.draft) + 1):
            gain = expected_tokens(self.acceptance, length) - rate * chain(length + 1)
            if gain > best:
                best, best_len = gain, length
        return best, best_len


@dataclass(frozen=True)
class Choice:
    source: str
    draft: tuple[int, ...]  # the (possibly shortened) draft to verify
    expected: float  # tokens this verify is expected to yield


def plain_tokens_per_ms(n: int, chain: CostTable, batch: CostTable, lone_plain_rows: int = 1) -> float:
    """What n sequences' shared plain decode yields per millisecond; a lone sequence that takes a
    companion row (lone_plain_rows 2) pays a 2-row decode for its one token."""
    return 1 / chain(lone_plain_rows) if n == 1 and lone_plain_rows > 1 else n / batch(n)


def choose(options: list[list[Option]], chain: CostTable, batch: CostTable, max_verifying: int | None = None,
           pinned: bool = False, lone_plain_rows: int = 1) -> list[Choice | None]:
    """Per sequence: the draft it verifies this step, or None (it decodes one token in the shared
    decode). options[i]: sequence i's drafts. max_verifying: at most this many verify (None: no limit).
    pinned: every sequence with a draft verifies its best option whole (fixed configurations and
    tests), up to max_verifying. lone_plain_rows: the rows a lone sequence's plain decode takes (2
    where it needs a companion row, backend/decode_plan.py): it then costs chain(2), what a verify
    of one draft token costs, so a draft's first token rides in the companion's place for free."""
    n = len(options)
    out: list[Choice | None] = [None] * n
    cap = n if max_verifying is None else min(n, max_verifying)
    if pinned:
        for i, opts in enumerate(options):
            if opts and sum(c is not None for c in out) < cap:
                best = max(opts, key=lambda o: expected_tokens(o.acceptance, len(o.draft)))
                out[i] = Choice(best.source, best.draft, expected_tokens(best.acceptance, len(best.draft)))
        return out
    if not n or cap == 0:
        return out
    # Rank sequences by what their best draft wins over plain decoding's per-token rate, then try the
    # best k of them verifying (k = 0..cap) and keep the k with the highest tokens per millisecond.
    plain_rate = plain_tokens_per_ms(n, chain, batch, lone_plain_rows)
    ranked = []
    for i, opts in enumerate(options):
        scored = [(o.best_length(plain_rate, chain), o) for o in opts if o.draft]
        if scored:
            (gain, length), opt = max(scored, key=lambda s: s[0][0])
            ranked.append((gain, i, opt, length))
    ranked.sort(key=lambda r: -r[0])
    best_rate, best_k = plain_rate, 0
    tokens, ms = 0.0, 0.0
    for k, (_, i, opt, length) in enumerate(ranked[:cap], start=1):
        tokens += expected_tokens(opt.acceptance, length)
        ms += chain(length + 1)
        rate = (tokens + n - k) / (ms + batch(n - k))
        if rate > best_rate:
            best_rate, best_k = rate, k
    for _, i, opt, length in ranked[:best_k]:
        out[i] = Choice(opt.source, opt.draft[:length], expected_tokens(opt.acceptance, length))
    return out
