"""A stop string for tests: one that a greedy continuation contains across a token boundary. Chosen
from the text the model wrote on this machine, since llama.cpp's numbers (and so the continuation)
differ between CPUs."""

from __future__ import annotations


def spanning_stop(pieces: list[str], width: int = 2) -> str:
    """`width` characters from the end of one token's text and `width` from the start of the next,
    at the first boundary past the first few tokens where the string first occurs in the whole text
    right there (so a cut at its first occurrence cuts inside that pair of tokens)."""
    text = "".join(pieces)
    start = len(pieces[0])
    for i in range(1, len(pieces) - 1):
        start += len(pieces[i])
        if i < 3 or len(pieces[i]) < width or len(pieces[i + 1]) < width:
            continue
        stop = pieces[i][-width:] + pieces[i + 1][:width]
        if text.index(stop) == start - width:
            return stop
    raise AssertionError(f"no token boundary to put a stop string across in {pieces!r}")
