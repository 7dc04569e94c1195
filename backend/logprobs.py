"""Log-probabilities in the protocol's shape, from the model's raw logits (before bias, penalties and
temperature, as OpenAI reports them)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from backend.llama_model import LlamaModel
from backend.sampling import log_softmax_top
from common.protocol import TokenLogprob, TopLogprob


def token_logprob(model: LlamaModel, logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    chosen, top = log_softmax_top(logits, token, top_n)
    piece = model.token_bytes(token)
    return TokenLogprob(
        token_id=token,
        token=piece.decode("utf-8", "replace"),
        bytes=list(piece),
        logprob=chosen,
        top=[
            TopLogprob(token_id=t, token=(b := model.token_bytes(t)).decode("utf-8", "replace"), bytes=list(b), logprob=lp)
            for t, lp in top
        ],
    )


def prompt_logprobs(
    model: LlamaModel, tokens: list[int], start: int, end: int, top_n: int, logits_of: Callable[[int], np.ndarray]
) -> list[TokenLogprob]:
    """Logprobs of the prompt tokens a chunk [start, end) predicts: row j's logits predict token j+1
    (logits_of(j - start)); the prompt's first token has none."""
    out = []
    if start == 0:
        piece = model.token_bytes(tokens[0])
        out.append(TokenLogprob(token_id=tokens[0], token=piece.decode("utf-8", "replace"), bytes=list(piece), logprob=None))
    for j in range(start, min(end, len(tokens) - 1)):
        out.append(token_logprob(model, logits_of(j - start), tokens[j + 1], top_n))
    return out
