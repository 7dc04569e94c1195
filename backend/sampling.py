"""Per-sequence token sampling with llama.cpp's native sampler chain, and log-probabilities.

Plain greedy decoding (temperature 0, no penalties, no bias) takes an argmax over a zero-copy view of
the logits, which is the hot path of the benchmark; everything else goes through a llama.cpp sampler
chain (logit bias -> penalties -> top-k -> temperature -> top-p -> seeded dist), so per-token Python stays small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import llama_cpp as llama
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def plain_greedy(self) -> bool:
        return (
            self.temperature == 0.0
            and not self.logit_bias
            and self.presence_penalty == 0.0
            and self.frequency_penalty == 0.0
        )


class Sampler:
    """Samples one sequence's tokens; keeps the sequence's penalty history inside the native chain."""

    def __init__(self, params: SamplingParams, n_vocab: int, seed_offset: int = 0):
        self.params = params
        self.chain = None
        if params.plain_greedy:
            return
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if params.logit_bias:
            arr = (llama.llama_logit_bias * len(params.logit_bias))()
            for i, (tok, bias) in enumerate(params.logit_bias):
                arr[i].token = tok
                arr[i].bias = bias
            llama.llama_sampler_chain_add(
                chain, llama.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), arr)
            )
        if params.presence_penalty or params.frequency_penalty:
            # OpenAI semantics: penalties count the generated tokens (the chain only sees those).
            llama.llama_sampler_chain_add(
                chain,
                llama.llama_sampler_init_penalties(
                    n_vocab, 1 << 20, 1.0, params.frequency_penalty, params.presence_penalty
                ),
            )
        if params.temperature == 0.0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        else:
            # Top-k (by rank: the same before or after temperature), then temperature before top-p, as
            # OpenAI and vLLM apply them.
            if params.top_k > 0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(params.top_k))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(params.temperature))
            if params.top_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(_seed(params.seed, seed_offset)))
        self.chain = chain

    def sample(self, ctx, logits_index: int, logits: np.ndarray) -> int:
        """Pick the next token from the output at `logits_index` of the last decode."""
        if self.chain is None:
            return int(logits.argmax())
        # llama_sampler_sample applies the chain and accepts the token (penalty history).
        return llama.llama_sampler_sample(self.chain, ctx, logits_index)

    def accept(self, token: int) -> None:
        """Record a token chosen without sampling (Medusa's typical acceptance) in the penalty history."""
        if self.chain is not None:
            llama.llama_sampler_accept(self.chain, token)

    def close(self) -> None:
        if self.chain is not None:
            llama.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        self.close()


def _seed(seed: int | None, offset: int) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(4), "little")
    # The n choices of one seeded request differ from each other but are each reproducible.
    return (seed + offset) & 0xFFFFFFFF


def log_softmax_top(logits: np.ndarray, chosen: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the top_n most likely (token, log-probability) pairs,
    from the model's raw distribution (before bias, penalties and temperature)."""
    x = logits
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))
    chosen_lp = float(x[chosen]) - lse
    if top_n <= 0:
        return chosen_lp, []
    idx = np.argpartition(x, -top_n)[-top_n:]
    idx = idx[np.argsort(-x[idx], kind="stable")]
    return chosen_lp, [(int(t), float(x[t]) - lse) for t in idx]
