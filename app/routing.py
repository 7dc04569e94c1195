"""Which model server (replica) a request goes to: the routing policy as pure functions.

1. Prompt-cache affinity. Each replica keeps finished requests' KV cells and reuses them for a later
   prompt that shares a prefix (backend/slots.py), so a conversation's next turn, or another question
   about the same document or system prompt, is fastest on the replica that served the earlier one.
   The router cannot see tokens (the model server tokenizes), so it matches text: a prompt is cut
   into blocks of BLOCK_CHARS characters, each block's key hashes it together with every block
   before it, and a replica remembers the keys of what it was sent. A request's match on a replica
   is the number of its leading keys that replica remembers.
2. Load. Affinity must not pile work onto one replica: when the replica with the best match has more
   than `imbalance` sequences more queued and running than the least loaded one (the queue-imbalance
   threshold of Ray Serve's prefix-aware router and llm-d's scorers), the least loaded one wins; its
   prefill costs less than waiting behind a batch.
3. No match: the least loaded replica; among equals, the one a hash of the prompt's first block
   picks, so requests sharing an opening (a system prompt) land together from the first one on.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

BLOCK_CHARS = 64
MAX_BLOCKS = 256  # prefixes longer than 16k characters are matched on their first 16k


def prompt_text(req) -> str:
    """The text a request's prompt starts with, as the model server will see it: the prompt, the
    token ids, or the chat messages (roles and contents; tools before them)."""
    if req.messages is not None:
        parts = [f"tools:{[t.name for t in req.tools]}"] if req.tools else []
        parts += [f"{m.role}\x1f{m.content or ''}" for m in req.messages]
        return "\x1e".join(parts)
    if isinstance(req.prompt, list):
        return " ".join(map(str, req.prompt))
    return req.prompt or ""


def prefix_keys(text: str) -> list[bytes]:
    """One key per full block of the text: a hash of the block and every block before it."""
    keys, h = [], hashlib.blake2b(digest_size=12)
    for i in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS) - BLOCK_CHARS + 1, BLOCK_CHARS):
        h.update(text[i : i + BLOCK_CHARS].encode("utf-8", "surrogatepass"))
        keys.append(h.copy().digest())
    return keys


class PrefixMemory:
    """The prefix keys a replica was sent, least recently used out first."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def matched(self, keys: list[bytes]) -> int:
        n = 0
        for k in keys:
            if k not in self._keys:
                break
            n += 1
        return n

    def add(self, keys: list[bytes]) -> None:
        for k in keys:
            self._keys[k] = None
            self._keys.move_to_end(k)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def forget(self) -> None:
        """A replica that restarted has lost its cache."""
        self._keys.clear()


@dataclass(frozen=True)
class Candidate:
    """What the policy knows of a replica for one request."""

    name: str
    load: int  # sequences queued and running there
    matched: int  # leading prefix blocks of this request it holds


POLICIES = ("affinity", "least_loaded", "round_robin")


def choose(candidates: list[Candidate], imbalance: int, tie_key: bytes = b"", policy: str = "affinity",
           turn: int = 0) -> str | None:
    """The replica for a request (by name), or None without candidates. Candidates: healthy replicas
    serving the request's model. The baselines: `least_loaded` ignores prefixes; `round_robin` takes
    candidate `turn` modulo their number (in name order), ignoring load too."""
    if not candidates:
        return None
    if policy == "round_robin":
        return sorted(c.name for c in candidates)[turn % len(candidates)]
    if policy == "least_loaded":
        candidates = [Candidate(c.name, c.load, 0) for c in candidates]
    least = min(c.load for c in candidates)
    best = max(c.matched for c in candidates)
    if best > 0:
        holders = sorted((c for c in candidates if c.matched == best), key=lambda c: (c.load, c.name))
        if holders[0].load - least <= imbalance:
            return holders[0].name
    idle = sorted(c.name for c in candidates if c.load == least)
    return idle[int.from_bytes(tie_key[:4] or b"\0", "big") % len(idle)]
