"""The engine on the real default model (in-process, no HTTP)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.config import BackendSettings
from backend.local import run_requests
from backend.runtime import ModelService
from common.protocol import ChatMessage, GenerationRequest
from tests.stop_strings import spanning_stop

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


def logits_by_hand(service, tokens: list[int]) -> np.ndarray:
    """Every position's logits [len(tokens), n_vocab] (float64) for a prompt decoded in one batch on
    the engine's own context, on the engine thread between steps (Engine.call)."""
    def by_hand(m):
        seq = next(s.seq_id for s in service.engine.slots.slots if not s.busy)
        m.seq_rm(seq)
        m.batch_clear()
        for i, t in enumerate(tokens):
            m.batch_add(t, i, seq, True)
        assert m.decode() == 0
        out = np.stack([m.logits(i).astype(np.float64) for i in range(len(tokens))])
        m.seq_rm(seq)
        return out

    return service.engine.call(by_hand)


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


# About 650 tokens: three prefill chunks of 256, so their prefill runs across steps in which others decode.
LONG_PROMPTS = [
    " ".join(f"Chapter {i}: the caravan crossed the {w} desert, and the traders counted their {g} again."
             for i, (w, g) in enumerate(zip(["red", "white", "long", "silent", "golden"] * 7, ["coins", "camels", "spices"] * 11)))
    + " At the end of the journey the oldest trader said",
    "Here is a long Python module.\n" + "\n".join(
        f"def step_{i}(x):\n    return x * {i} + {i * i}  # step {i} of the pipeline\n" for i in range(22))
    + "\ndef run_all(x):\n    ",
]


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


def test_long_prompts_prefilled_while_others_decode_match_alone(model_service):
    """Prompts of three prefill chunks join while others decode; every request's tokens and the
    logprob of each (the exact numbers, not a tolerance) are those it gets alone."""
    m = model_service.model
    assert all(len(m.tokenize(p, True)) > 600 for p in LONG_PROMPTS)
    # A fresh first line, so that the long prompts are prefilled cold (not from the prompt cache) in
    # the concurrent run; the runs alone afterwards are served from the cache, exact as well.
    fresh = f"Log {next(_ids)}.\n"
    mixed = [(PROMPTS[0], 40), (fresh + LONG_PROMPTS[0], 24), (PROMPTS[3], 48), (fresh + LONG_PROMPTS[1], 24), (PROMPTS[6], 30)]
    reqs = [req(p, max_tokens=n, logprobs=0) for p, n in mixed]
    together = run_requests(model_service, reqs)
    alone = [one(model_service, prompt=p, max_tokens=n, logprobs=0).choices[0] for p, n in mixed]
    assert_long_prefill_overlapped_and_exact(reqs, together, alone)


def assert_long_prefill_overlapped_and_exact(reqs, together, alone) -> None:
    """reqs[1] (a long prompt) was prefilled while reqs[0] decoded (reqs[0] produced 3+ tokens before
    reqs[1]'s first), and every request's tokens and logprobs are exactly those of `alone`."""
    first_long = together[reqs[1].id].choices[0].token_times[0]
    assert sum(first_long > t for t in together[reqs[0].id].choices[0].token_times) >= 3
    for r, expected in zip(reqs, alone):
        got = together[r.id].choices[0]
        assert got.token_ids == expected.token_ids, r.prompt[:40]
        assert [e.logprob for e in got.logprobs] == [e.logprob for e in expected.logprobs], r.prompt[:40]


def test_generation_to_the_context_end_matches_alone(model_service):
    """Two requests run to the end of their context side by side: each token's logprob is exactly
    the one it has alone, also past position 255 (companion rows) up to the context's last cell.
    A context of 512 and prompts of 400 tokens keep it short."""
    service = ModelService(BackendSettings(model=str(model_service.model.path), ctx_size=512, n_parallel=2, threads=2,
                                           medusa_heads="none"))
    with service:
        end_of_turn = service.model.tokenize("<end_of_turn>", add_special=False)
        assert len(end_of_turn) == 1 and service.model.is_eog(end_of_turn[0])
        eos = {service.model.eos: -100.0, end_of_turn[0]: -100.0}  # Gemma's two end tokens: run to the end
        prompts = [service.model.tokenize(p, True)[:400] for p in LONG_PROMPTS]
        reqs = [req(p, max_tokens=None, logprobs=0, logit_bias=eos) for p in prompts]
        alone = [run_requests(service, [r])[r.id].choices[0] for r in reqs]
        again = [req(r.prompt, max_tokens=None, logprobs=0, logit_bias=eos) for r in reqs]
        together = run_requests(service, again)
        for r, a in zip(again, alone):
            t = together[r.id].choices[0]
            assert a.finish_reason == t.finish_reason == "length"
            assert len(t.token_ids) + len(r.prompt) == 512
            assert t.token_ids == a.token_ids
            assert [e.logprob for e in t.logprobs] == [e.logprob for e in a.logprobs]


def test_seed_reproducible_and_seeds_differ(model_service):
    kw = dict(temperature=1.0, max_tokens=24, prompt="Once upon a time")
    a, b = one(model_service, seed=1234, **kw), one(model_service, seed=1234, **kw)
    c = one(model_service, seed=999, **kw)
    assert a.choices[0].token_ids == b.choices[0].token_ids
    assert a.choices[0].token_ids != c.choices[0].token_ids


def test_n_choices_share_the_prompt_and_differ(model_service):
    stats = model_service.engine.stats
    before = stats.prompt_tokens
    r = one(model_service, prompt="Once upon a time", n=3, temperature=1.0, seed=7, max_tokens=12)
    assert r.prompt.prompt_tokens == 5
    # prefilled once for three choices, then copied (an earlier test's cells may serve part of it)
    assert stats.prompt_tokens - before == r.prompt.prompt_tokens - r.prompt.cached_tokens
    texts = [r.choices[i].token_ids for i in range(3)]
    assert len(set(map(tuple, texts))) == 3
    # Choice i of a seeded request is the single request with seed + i (README).
    for i in range(3):
        assert one(model_service, prompt="Once upon a time", temperature=1.0, seed=7 + i, max_tokens=12).choices[0].token_ids == texts[i]
    greedy = one(model_service, prompt="Once upon a time", n=2, max_tokens=12)
    assert greedy.choices[0].token_ids == greedy.choices[1].token_ids == one(model_service, prompt="Once upon a time", max_tokens=12).choices[0].token_ids


def test_stop_string_is_never_emitted(model_service):
    free = one(model_service, max_tokens=30).choices[0]
    # Stop on a string the greedy continuation contains across a token boundary.
    assert "".join(free.deltas) == free.text  # a boundary between deltas is one between tokens
    stop = spanning_stop(free.deltas)
    stopped = one(model_service, max_tokens=30, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.stop_sequence == stop
    assert free.stop_sequence is None
    assert stopped.text == free.text[: free.text.index(stop)]
    assert all(stop not in d for d in stopped.deltas)


def test_top_k_one_samples_the_argmax_and_top_k_keeps_seeds_reproducible(model_service):
    greedy = one(model_service, max_tokens=12).choices[0].token_ids
    assert one(model_service, max_tokens=12, temperature=1.5, seed=3, top_k=1).choices[0].token_ids == greedy
    a = one(model_service, max_tokens=12, temperature=1.5, seed=3, top_k=5).choices[0].token_ids
    assert a == one(model_service, max_tokens=12, temperature=1.5, seed=3, top_k=5).choices[0].token_ids
    assert a != one(model_service, max_tokens=12, temperature=1.5, seed=3).choices[0].token_ids  # top-k applied


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
    """The reported distribution is the model's raw one: check it against logits decoded by hand,
    greedy, and with a temperature and a bias that bans the top token (README: logprobs are taken
    before bias, penalties and temperature)."""
    m = model_service.model
    tokens = m.tokenize("The capital of France is", add_special=True)
    expected = log_softmax(logits_by_hand(model_service, tokens)[-1])
    top = int(expected.argmax())
    greedy = one(model_service, max_tokens=1, logprobs=5).choices[0]
    hot = one(model_service, max_tokens=1, logprobs=5, temperature=1.5, seed=1, logit_bias={top: -100}).choices[0]
    assert greedy.token_ids == [top] and hot.token_ids[0] != top  # the bias did act on the sampling
    for r in (greedy, hot):
        entry = r.logprobs[0]
        assert entry.logprob == pytest.approx(expected[entry.token_id], abs=1e-3)
        assert [t.token_id for t in entry.top] == list(np.argsort(-expected)[:5])
        assert [t.logprob for t in entry.top] == pytest.approx(list(np.sort(expected)[::-1][:5]), abs=1e-3)
    assert hot.logprobs[0].top[0].token_id == top  # the banned token is still reported with its raw logprob


def test_prompt_logprobs_for_echo(model_service):
    r = one(model_service, max_tokens=1, logprobs=2, prompt_logprobs=True, echo_prompt=True)
    lps = r.prompt.logprobs
    assert r.prompt.text == "The capital of France is"
    tokens = model_service.model.tokenize("The capital of France is", add_special=True)
    assert [e.token_id for e in lps] == tokens and lps[0].logprob is None
    expected = np.stack([log_softmax(row) for row in logits_by_hand(model_service, tokens)])
    for j, e in enumerate(lps[1:], start=1):  # row j-1 predicts prompt token j
        assert e.logprob == pytest.approx(expected[j - 1][tokens[j]], abs=1e-3)
        assert [t.token_id for t in e.top] == list(np.argsort(-expected[j - 1])[:2])
    assert "".join(e.token for e in lps) == "The capital of France is"


def test_prompt_logprobs_of_a_prompt_longer_than_one_logprobs_chunk(model_service):
    from backend.scheduler import PROMPT_LOGPROBS_CHUNK

    prompt = ("One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen, "
              "fifteen, sixteen, seventeen, eighteen, nineteen, twenty.")
    tokens = model_service.model.tokenize(prompt, add_special=True)
    assert len(tokens) > PROMPT_LOGPROBS_CHUNK
    r = one(model_service, prompt=prompt, max_tokens=1, logprobs=0, prompt_logprobs=True)
    expected = logits_by_hand(model_service, tokens)
    got = [e.logprob for e in r.prompt.logprobs[1:]]
    want = [log_softmax(expected[j - 1])[tokens[j]] for j in range(1, len(tokens))]
    assert got == pytest.approx(want, abs=2e-3)


def test_utf8_is_never_broken_in_a_stream(model_service):
    # Gemma spells these hieroglyphs with byte tokens: four tokens per character, none valid UTF-8 alone.
    m = model_service.model
    r = one(model_service, prompt="Ancient Egyptian hieroglyphs: 𓀀𓀁𓀂𓀃𓀄𓀅", max_tokens=20).choices[0]
    partial = []
    for t in r.token_ids:
        try:
            m.token_bytes(t).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(t)
    assert len(partial) >= 8  # several characters arrived in pieces
    assert sum(ord(ch) > 0xFFFF for ch in r.text) >= 2  # and were put together
    assert all("\ufffd" not in d for d in r.deltas)
    assert "".join(r.deltas) == r.text
    # Sampled text with emoji and CJK keeps the same guarantee (the last delta may flush a cut-off tail).
    for prompt, seed in (("Translate to Japanese: good morning =", 3), ("🙂🙂🙂 emoji party 🎉🎉", 11)):
        s = one(model_service, prompt=prompt, max_tokens=30, temperature=1.0, seed=seed).choices[0]
        assert all("\ufffd" not in d for d in s.deltas[:-1])


def test_penalties_and_logit_bias_change_the_output(model_service):
    from collections import Counter

    base = one(model_service, prompt="1, 2, 3, 4,", max_tokens=24).choices[0]
    banned = base.token_ids[0]
    biased = one(model_service, prompt="1, 2, 3, 4,", max_tokens=24, logit_bias={banned: -100}).choices[0]
    assert banned not in biased.token_ids
    forced = one(model_service, prompt="1, 2, 3, 4,", max_tokens=3, logit_bias={1234: 100}).choices[0]
    assert forced.token_ids == [1234, 1234, 1234]
    rep = one(model_service, prompt="1, 2, 3, 4,", max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0).choices[0]
    assert len(rep.token_ids) == len(base.token_ids) == 24
    assert rep.token_ids != base.token_ids
    most, count = Counter(base.token_ids).most_common(1)[0]
    assert count >= 4 and rep.token_ids.count(most) < count


def test_penalties_count_generated_tokens_only(model_service):
    """README: presence/frequency penalties count generated tokens, not the prompt's."""
    prompt = "1 1 1 1 1 1 1 1 1 1 1 1"
    base = one(model_service, prompt=prompt, max_tokens=6, logprobs=2).choices[0]
    pen = one(model_service, prompt=prompt, max_tokens=6, frequency_penalty=2.0, presence_penalty=2.0).choices[0]
    first = base.logprobs[0]
    in_prompt = model_service.model.tokenize(prompt, add_special=True).count(first.token_id)
    # Were prompt tokens counted, the first token would lose 2*count + 2, far more than its lead.
    assert in_prompt >= 10 and first.top[0].logprob - first.top[1].logprob < 2.0 * in_prompt + 2.0
    assert len(set(base.token_ids[:2])) == 2  # " " then "1": neither generated before it
    assert pen.token_ids[:2] == base.token_ids[:2]  # so neither is penalised, though both fill the prompt
    assert pen.token_ids != base.token_ids  # once generated, the repeated token is penalised


def test_temperature_is_applied_before_top_p(model_service):
    """README: temperature first, then top-p (OpenAI's and vLLM's order). At temperature 1.5 the
    nucleus of 0.5 spans several tokens; on the raw distribution it is the single top token, so
    samples outside it show the order (and none outside the flattened nucleus show top-p acted)."""
    prompt, temperature, top_p = "Once upon a time", 1.5, 0.5
    logits = logits_by_hand(model_service, model_service.model.tokenize(prompt, add_special=True))[-1]

    def nucleus(x: np.ndarray) -> set[int]:  # llama.cpp's top-p: the smallest prefix reaching top_p
        p = np.exp(log_softmax(x))
        order = np.argsort(-p, kind="stable")
        return set(order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1].tolist())

    scaled, raw = nucleus(logits / temperature), nucleus(logits)
    assert len(raw) == 1 and raw < scaled and len(scaled) >= 5
    reqs = [req(prompt, max_tokens=1, temperature=temperature, top_p=top_p, seed=s, n=4) for s in range(0, 80, 10)]
    out = run_requests(model_service, reqs)
    samples = [c.token_ids[0] for r in reqs for c in out[r.id].choices.values()]
    assert len(samples) == 32
    assert set(samples) <= scaled
    assert set(samples) - raw


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
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"),
                ChatMessage(role="assistant", content="Hello."), ChatMessage(role="user", content="Name a colour.")]
    # The default GGUF is a base model without a template: a plain transcript it can continue.
    expected = "<bos>Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Name a colour.\nAssistant:"
    assert model_service.template.render([m.model_dump() for m in messages], "<bos>", "<eos>") == expected
    chat = req(prompt=None, messages=messages, max_tokens=8)
    prepared = model_service.prepare_one(chat)
    assert prepared.tokens == model_service.model.tokenize(expected, add_special=False)
    assert prepared.tokens.count(model_service.model.bos) == 1
    assert prepared.stop == ["\nUser:"]  # the transcript's stop string, added to every chat request
    # The engine generates from those tokens: the same as the rendered text sent as a prompt.
    as_chat = run_requests(model_service, [chat])[chat.id].choices[0].token_ids
    as_text = one(model_service, prompt=prepared.tokens, max_tokens=8, stop=["\nUser:"]).choices[0].token_ids
    assert as_chat == as_text


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
    assert engine.slots.free == model_service.model.n_parallel
