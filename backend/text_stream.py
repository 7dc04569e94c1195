"""Turns a sequence's token bytes into text that is safe to send: whole UTF-8 characters only, and no
part of a stop string, even one that spans several tokens."""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stops: list[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""  # decoded text not released yet: it may be the start of a stop string
        self.matched: str | None = None  # the stop string that ended the stream

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes. Returns (text that may be released now, whether a stop string hit).
        After a stop hit the stream is finished: the stop string and anything after it is dropped."""
        self._held += self._decoder.decode(piece)
        if not self._stops:
            out, self._held = self._held, ""
            return out, False
        hits = [(i, k) for k, i in enumerate(self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            cut, k = min(hits)  # the earliest in the text; of two there, the first listed
            self.matched = self._stops[k]
            out, self._held = self._held[:cut], ""
            return out, True
        keep = self._longest_stop_prefix_suffix()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(out) :]
        return out, False

    def flush(self) -> str:
        """At the end of generation (not after a stop): release what was held, incomplete UTF-8 as U+FFFD."""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        # Length of the longest suffix of the held text that is a proper prefix of some stop string.
        held = self._held
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(held)), best, -1):
                if held.endswith(stop[:n]):
                    best = n
                    break
        return best
