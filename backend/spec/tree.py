"""Medusa trees as data, and the acceptance rules, as plain functions over arrays.

A tree is a list of Medusa choices (the format of Medusa's `medusa_choices.py`): each node is the
path of per-head top-k ranks from the root, e.g. (0,) is head 0's best guess and (0, 1) head 1's
second guess below it.

On this llama.cpp the engine verifies one path per sequence. A branching tree needs its paths'
sequence ids to share KV cells, which only a unified KV cache allows, and a unified cache changes a
sequence's logits with the placement of its cells (measured: BENCHMARKS.md), so greedy output would
no longer match plain decoding. A path is exact: its tokens are one sequence's ordinary multi-token
decode.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np

Choices = list[tuple[int, ...]]


class TreeError(ValueError):
    pass


def parse_choices(text: str) -> Choices:
    """Choices from JSON, a Python list literal, or a `name = [...]` line of medusa_choices.py."""
    text = text.strip()
    if "=" in text.split("[", 1)[0]:
        text = text.split("=", 1)[1].strip()
    try:
        raw = json.loads(text)
    except ValueError:
        try:
            raw = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise TreeError(f"not a list of Medusa choices: {text[:80]!r}") from e
    if isinstance(raw, dict):
        raw = raw.get("choices")
    if not isinstance(raw, (list, tuple)):
        raise TreeError("Medusa choices must be a list of paths, e.g. [[0], [0, 0]]")
    out = []
    for node in raw:
        if not isinstance(node, (list, tuple)) or not node or not all(isinstance(r, int) and r >= 0 for r in node):
            raise TreeError(f"bad Medusa choice {node!r}: a non-empty path of ranks >= 0")
        out.append(tuple(node))
    return out


def validate(choices: Choices, n_heads: int) -> None:
    if len(set(choices)) != len(choices):
        raise TreeError("Medusa choices repeat a node")
    nodes = set(choices)
    for node in choices:
        if len(node) > n_heads:
            raise TreeError(f"choice {list(node)} is deeper than the {n_heads} heads")
        if len(node) > 1 and node[:-1] not in nodes:
            raise TreeError(f"choice {list(node)} has no parent {list(node[:-1])} in the tree")


def path_ranks(choices: Choices) -> list[int]:
    """The per-depth ranks of a tree that is a single path; an error for a branching tree."""
    ordered = sorted(choices, key=len)
    for depth, node in enumerate(ordered, start=1):
        if len(node) != depth or (depth > 1 and node[:-1] != ordered[depth - 2]):
            raise TreeError(
                "this engine verifies one path per sequence (e.g. [[0], [0, 0], [0, 0, 0]]); branching trees "
                "need a unified KV cache, which makes greedy output depend on cell placement"
            )
    return [node[-1] for node in ordered]


def chain(n: int) -> Choices:
    """The top-1 path of depth n."""
    return [(0,) * d for d in range(1, n + 1)]


def candidates(proposals: np.ndarray, ranks: list[int]) -> list[int]:
    """The path's tokens: head d's rank-ranks[d] proposal. proposals: [n_heads, top_k]."""
    return [int(proposals[d, r]) for d, r in enumerate(ranks)]


def typical_ok(logits: np.ndarray, token: int, temperature: float, epsilon: float, alpha: float) -> bool:
    """Medusa's typical acceptance: keep a candidate whose probability under the target (at this
    temperature) exceeds min(epsilon, alpha * exp(-entropy)). Faster, but not lossless: opt-in."""
    x = logits.astype(np.float64) / max(temperature, 1e-6)
    x -= x.max()
    p = np.exp(x)
    p /= p.sum()
    entropy = float(-(p * np.log(p + 1e-12)).sum())
    return float(p[token]) > min(epsilon, alpha * math.exp(-entropy))


def load_tree(spec: str) -> tuple[Choices, dict]:
    """A tree from a tuning result (JSON with "choices"), a choices file, or an inline list."""
    path = Path(spec)
    if spec and not spec.lstrip().startswith(("[", "(")) and path.exists():
        text = path.read_text()
        try:
            data = json.loads(text)
        except ValueError:
            return parse_choices(text), {}
        if isinstance(data, dict):
            return [tuple(c) for c in data.get("choices", [])], data
        return parse_choices(text), {}
    return parse_choices(spec), {}
