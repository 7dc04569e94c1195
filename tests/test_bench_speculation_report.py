"""bench.speculation's summary, on a hand-made report: the ratios it states and the greedy checks,
ours against our plain configuration and llama-server's against its own default at -np 1."""

from __future__ import annotations

from bench.speculation import markdown, summary


def _row(streams: int, tok_s: float, texts: list[str]) -> dict:
    results = [{"id": i, "category": "rag", "text": t, "tokens": 11, "ttft_s": 0.1, "decode_s": 10 / tok_s}
               for i, t in enumerate(texts)]
    return {"streams": streams, "stream_tok_s": tok_s, "ttft_p50_ms": 100.0, "tokens": 11 * len(texts),
            "by_category": {"rag": tok_s}, "results": results}


def test_summary_ratios_and_greedy_checks():
    plain, both = ["a", "b", "c"], ["a", "b", "x"]
    rep = {"prompts": [{}] * 3, "max_tokens": 10, "threads": 2, "best_ngram": "ngram-cache", "servers": {
        "ours plain": {"levels": [_row(1, 50.0, plain), _row(4, 20.0, plain)]},
        "ours Medusa + lookup": {"levels": [_row(1, 75.0, both), _row(4, 21.0, plain)]},
        "llama-server": {"levels": [_row(1, 60.0, plain), _row(4, 19.0, ["a", "z", "c"])]},
        "ngram-cache": {"levels": [_row(1, 90.0, ["q", "b", "c"])], "flags": []},
    }}
    s = summary(rep)
    r = s["ratios"]
    assert r["ours Medusa + lookup / plain, 1 stream"] == 1.5
    assert r["ours Medusa + lookup / plain, 4 streams (per stream)"] == 1.05
    assert r["ours Medusa + lookup / plain, 1 stream, rag"] == 1.5
    assert r["ours Medusa + lookup / llama-server default, 1 stream"] == 1.25
    assert r["ours Medusa + lookup / llama-server ngram-cache (best n-gram), 1 stream"] == 0.833
    # ours: 5 of the 6 requests over both levels wrote what plain wrote at one stream
    assert s["greedy_identical_to_plain"] == {"ours Medusa + lookup": "5/6"}
    # llama-server's -np 4 and its n-gram type against its own default at -np 1
    assert s["llama_server_identical_to_its_default"] == {"llama-server": "2/3", "ngram-cache": "2/3"}
    rep["summary"] = s
    md = markdown(rep)
    assert "ours Medusa + lookup 5/6" in md and "llama-server 2/3, ngram-cache 2/3" in md


def test_summary_counts_what_exactness_fast_changes_and_runs_without_plain():
    """EXACTNESS=fast is judged against llama-server's best n-gram setting, and its greedy answers are
    counted against plain (strict) decoding's; a run of a subset of configurations still summarises."""
    plain, fast = ["a", "b", "c"], ["a", "y", "c"]
    rep = {"prompts": [{}] * 3, "max_tokens": 10, "threads": 2, "best_ngram": "ngram-map-k n3 m8", "servers": {
        "ours plain": {"levels": [_row(1, 50.0, plain)]},
        "ours fast (EXACTNESS=fast)": {"levels": [_row(1, 120.0, fast)]},
        "ngram-map-k n3 m8": {"levels": [_row(1, 100.0, plain)], "flags": []},
    }}
    s = summary(rep)
    assert s["ratios"]["ours fast (EXACTNESS=fast) / plain, 1 stream"] == 2.4
    assert s["ratios"]["ours fast (EXACTNESS=fast) / llama-server ngram-map-k n3 m8 (best n-gram), 1 stream"] == 1.2
    assert s["greedy_identical_to_plain"] == {"ours fast (EXACTNESS=fast)": "2/3"}
    rep["servers"].pop("ours plain")
    assert summary(rep)["greedy_identical_to_plain"] == {}
