"""The benchmark's prompts are not the heads' training data: no bench prompt, passage or code snippet
appears in the corpus the heads are trained and judged on, and no topic the corpus asks about
appears in a bench prompt (backend/medusa/corpus.py, bench/mixed_prompts.py)."""

from __future__ import annotations

from pathlib import Path

from backend.medusa import corpus
from bench.mixed_prompts import CATEGORIES, prompts

SHIPPED = sorted((Path(__file__).parent.parent / "heads").glob("*/corpus.jsonl.gz"))


def test_bench_prompts_are_not_in_the_training_corpus():
    # What this machine would build, and what the shipped heads were trained on (built elsewhere).
    assert SHIPPED
    examples = corpus.build(10**6) + [e for path in SHIPPED for e in corpus.load(path)]
    texts = [e.prompt or "\n".join(c for _, c in e.messages) for e in examples]
    blob = "\n".join(texts)
    bench = prompts()
    assert len(bench) == 6 * len(CATEGORIES)
    for p in bench:
        text = p.get("prompt") or p["messages"][-1]["content"]
        for line in text.splitlines():
            if len(line.strip()) >= 24:  # any sizeable line of a bench prompt
                assert line.strip() not in blob, line
    topics = [t for t in (corpus.DATA / "topics.txt").read_text().splitlines() if t and not t.startswith("#")]
    bench_text = " ".join((p.get("prompt") or p["messages"][-1]["content"]).lower() for p in bench)
    assert [t for t in topics if f" {t.lower()} " in f" {bench_text} "] == []
