"""The engine on the real default model (in-process, no HTTP)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.local import run_requests
from common.protocol import ChatMessage, GenerationRequest

PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Once upon a time",
    "def fibonacci(n):",
    "The best way to learn a language is",
    "In 1492, Columbus",
    "Water boils at",
    "My favourite food is a very long story that begins when I was a child living in a small village by "
    "the sea, where every morning the fishermen came back with their boats full of",
]
_ids = iter(range(10**9))


def req(prompt="The capital of France is", **kw) -> GenerationRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 16)
    return GenerationRequest(id=f"t{next(_ids)}", prompt=prompt, **kw)


def one(service, **kw):
    r = req(**kw)
    return run_requests(service, [r])[r.id]


def test_greedy_is_deterministic(model_service):
    a, b = one(model_service, max_tokens=24), one(model_service, max_tokens=24)
    assert a.choices[0].token_ids == b.choices[0].token_ids
    assert len(a.choices[0].token_ids) == 24 and a.choices[0].finish_reason == "length"
    assert a.choices[0].text.strip()


def test_greedy_under_concurrency_matches_alone(model_service):
    lengths = [8, 40, 16, 32, 24, 12, 48, 20]
    alone = {p: one(model_service, prompt=p, max_tokens=n).choices[0].token_ids for p, n in zip(PROMPTS, lengths)}
    reqs = [req(p, max_tokens=n) for p, n in zip(PROMPTS, lengths)]
    together = run_requests(model_service, reqs)  # 8 requests, 4 slots: joins and leaves mid-flight
    for r in reqs:
        assert together[r.id].choices[0].token_ids == alone[r.prompt], r.prompt


def test_seed_reproducible_and_seeds_differ(model_service):
    kw = dict(temperature=1.0, max_tokens=24, prompt="Once upon a time")
    a, b = one(model_service, seed=1234, **kw), one(model_service, seed=1234, **kw)
    c = one(model_service, seed=999, **kw)
    assert a.choices[0].token_ids == b.choices[0].token_ids
    assert a.choices[0].token_ids != c.choices[0].token_ids


def test_n_choices_share_the_prompt_and_differ(model_service):
    r = one(model_service, prompt="Once upon a time", n=3, temperature=1.0, seed=7, max_tokens=12)
    assert r.prompt.prompt_tokens == 5
    texts = [r.choices[i].token_ids for i in range(3)]
    assert len(set(map(tuple, texts))) == 3
    greedy = one(model_service, prompt="Once upon a time", n=2, max_tokens=12)
    assert greedy.choices[0].token_ids == greedy.choices[1].token_ids == one(model_service, prompt="Once upon a time", max_tokens=12).choices[0].token_ids


def test_stop_string_is_never_emitted(model_service):
    free = one(model_service, max_tokens=30).choices[0]
    # Stop on a string that the greedy continuation is known to contain, spanning a token boundary.
    assert " France." in free.text
    stopped = one(model_service, max_tokens=30, stop=["ce. "]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index("ce. ")]
    assert all("ce. " not in d for d in stopped.deltas)


def test_max_tokens_and_zero(model_service):
    r = one(model_service, max_tokens=5).choices[0]
    assert r.completion_tokens == 5 and r.finish_reason == "length"
    z = one(model_service, max_tokens=0)
    assert z.choices[0].completion_tokens == 0 and z.choices[0].text == ""


def test_logprobs_are_log_probabilities(model_service):
    r = one(model_service, max_tokens=6, logprobs=5).choices[0]
    assert len(r.logprobs) == 6
    for entry, tok in zip(r.logprobs, r.token_ids):
        assert entry.token_id == tok and entry.logprob <= 0.0
        tops = [t.logprob for t in entry.top]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-6
        # Greedy: the chosen token is the most likely one.
        assert entry.top[0].token_id == tok and entry.logprob == pytest.approx(tops[0])


def test_logprobs_match_a_direct_softmax(model_service):
    """The reported distribution is the model's: check it against logits decoded by hand."""
    m = model_service.model
    r = one(model_service, max_tokens=1, logprobs=1)
    # Token ids and logprob come from the engine; recompute p(token | prompt) with numpy.
    tokens = m.tokenize("The capital of France is", add_special=True)
    assert len(model_service.engine._free_seq_ids) == m.n_parallel  # the engine is idle
    seq = 0
    m.batch_clear()
    for i, t in enumerate(tokens):
        m.batch_add(t, i, seq, i == len(tokens) - 1)
    # Run on the engine thread's context only while it is idle: the engine has no work now.
    assert m.decode() == 0
    logits = m.logits(len(tokens) - 1).astype(np.float64)
    m.seq_rm(seq)
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    entry = r.choices[0].logprobs[0]
    assert entry.logprob == pytest.approx(expected[entry.token_id], abs=1e-3)


def test_prompt_logprobs_for_echo(model_service):
    r = one(model_service, max_tokens=1, logprobs=2, prompt_logprobs=True, echo_prompt=True)
    lps = r.prompt.logprobs
    assert r.prompt.text == "The capital of France is"
    assert len(lps) == r.prompt.prompt_tokens and lps[0].logprob is None
    assert all(e.logprob < 0 for e in lps[1:])
    assert "".join(e.token for e in lps) == "The capital of France is"


def test_utf8_is_never_broken_in_a_stream(model_service):
    # Emoji and CJK are several tokens' bytes each in Gemma's vocabulary.
    r = one(model_service, prompt="Translate to Japanese: good morning =", max_tokens=40, temperature=0.9, seed=3).choices[0]
    assert all("\ufffd" not in d for d in r.deltas[:-1])
    r2 = one(model_service, prompt="🙂🙂🙂 emoji party 🎉🎉", max_tokens=30, temperature=1.0, seed=11).choices[0]
    assert all("\ufffd" not in d for d in r2.deltas[:-1])
    assert "".join(r2.deltas) == r2.text


def test_penalties_and_logit_bias_change_the_output(model_service):
    base = one(model_service, prompt="1, 2, 3, 4,", max_tokens=12).choices[0]
    banned = base.token_ids[0]
    biased = one(model_service, prompt="1, 2, 3, 4,", max_tokens=12, logit_bias={banned: -100}).choices[0]
    assert banned not in biased.token_ids
    forced = one(model_service, prompt="1, 2, 3, 4,", max_tokens=3, logit_bias={1234: 100}).choices[0]
    assert forced.token_ids == [1234, 1234, 1234]
    rep = one(model_service, prompt="1, 2, 3, 4,", max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0).choices[0]
    assert rep.token_ids != base.token_ids[:24] and len(set(rep.token_ids)) > len(set(base.token_ids))


def test_context_overflow_is_a_clear_error(model_service):
    n_ctx = model_service.model.n_ctx_per_seq
    r = one(model_service, prompt="hello " * (n_ctx + 10), max_tokens=4)
    assert r.error is not None and r.error.code == "context_length_exceeded"
    assert str(n_ctx) in r.error.message
    r2 = one(model_service, prompt="hi", max_tokens=n_ctx)
    assert r2.error.code == "context_length_exceeded" and r2.error.param == "max_tokens"
    # Without max_tokens, generation may run to the context's end.
    r3 = one(model_service, prompt="hi", max_tokens=None, logit_bias={model_service.model.eos: -100}, n=1)
    assert r3.error is None  # (stops by EOS or length; never overflows)
    assert r3.prompt.prompt_tokens + r3.choices[0].completion_tokens <= n_ctx


def test_bad_token_ids_and_n_are_rejected(model_service):
    assert one(model_service, prompt=[2, 10**9]).error.param == "prompt"
    assert one(model_service, n=99).error.param == "n"
    assert one(model_service, logit_bias={-5: 1.0}).error.param == "logit_bias"


def test_chat_messages_use_the_template(model_service):
    r = one(model_service, prompt=None, messages=[ChatMessage(role="user", content="Hi")], max_tokens=4)
    expected = model_service.model.tokenize("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", add_special=False)
    assert r.prompt.prompt_tokens == len(expected)


def test_cancel_frees_the_slot(model_service):
    import queue

    engine = model_service.engine
    long = req("Once upon a time", max_tokens=900)
    inbox: queue.Queue = queue.Queue()
    engine.submit(model_service.prepare_one(long), inbox.put)
    got = []
    while not any(getattr(e, "type", "") == "delta" for e in got):
        got += inbox.get(timeout=30)
    engine.cancel([long.id])
    while not any(getattr(e, "type", "") == "done" for e in got):
        got += inbox.get(timeout=30)
    done = [e for e in got if e.type == "done"][0]
    assert done.finish_reason == "cancelled" and done.completion_tokens < 900
    # All slots are free again: four requests run at once and finish.
    reqs = [req(p, max_tokens=4) for p in PROMPTS[:4]]
    assert all(res.choices[0].finish_reason == "length" for res in run_requests(model_service, reqs).values())
    assert len(engine._free_seq_ids) == model_service.model.n_parallel
