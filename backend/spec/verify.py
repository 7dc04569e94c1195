"""Medusa verification as a plain function: walk the rows of one verify decode (the sequence's last
token, then its draft) and take each row's token while it confirms the draft.

Row r's logits are exactly what plain decoding gives at that position (the engine decodes the draft
in the sequence's own llama_decode), and `choose_row` picks the token exactly as plain decoding
would (greedy argmax, or the seeded sampler chain), so the emitted tokens are plain decoding's: the
walk only decides how many of them one decode yields.
"""

from __future__ import annotations

from collections.abc import Callable


def verify(draft: list[int], choose_row: Callable[[int], tuple[int, bool]]) -> int:
    """choose_row(r) chooses and emits row r's token and says whether the sequence finished with it.
    Rows are taken while each confirms the draft token after it; returns the accepted draft length.
    At most len(draft) + 1 tokens are emitted: the last from the base model alone."""
    accepted = 0
    for row in range(len(draft) + 1):
        token, finished = choose_row(row)
        matched = row < len(draft) and token == draft[row]
        accepted += matched
        if finished or not matched:
            break
    return accepted
