"""A seconds-long run of the benchmark: it produces its report (speed is not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_quick_benchmark_writes_its_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.compare", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "comparison.json").read_text())
    for name in ("ours", "engine in-process", "decode loop (floor)"):
        rows = report["servers"][name]
        assert rows and all(r["aggregate_tok_s"] > 0 for r in rows)
    assert report["servers"]["ours"][0]["errors"] == 0
    assert "1 stream: ours over HTTP / engine in-process" in report["ratios"]
    assert (tmp_path / "comparison.md").read_text().startswith("Model ")
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_multiturn_benchmark_writes_its_report(tmp_path):
    """bench.multiturn --quick: our stack only, one conversation of two turns (~7 s on an idle machine)."""
    out = subprocess.run([sys.executable, "-m", "bench.multiturn", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "multiturn.json").read_text())
    assert list(report["targets"]) == ["ours"] and report["think_ms"] == 0
    run = report["targets"]["ours"]["scenarios"]["a"]
    assert run["summary"]["requests"] == 2 and run["summary"]["errors"] == 0
    t1, t2 = run["turns"]
    assert (t1["turn"], t2["turn"]) == (1, 2) and t1["ttft_ms"] > 0 and t2["ttft_ms"] > 0
    # turn 2 resends turn 1 and its answer: a longer prompt
    assert t2["prompt_tokens"] > t1["prompt_tokens"] + t1["completion_tokens"]
    if t2["cached_tokens"] is not None:
        assert 0 <= t2["cached_tokens"] < t2["prompt_tokens"]
    assert abs(run["summary"]["ratio_p50"] - t2["ttft_ms"] / t1["ttft_ms"]) < 0.01
    assert (tmp_path / "multiturn.md").read_text().startswith("Model ")


def test_quick_speculation_benchmark_writes_its_report(tmp_path):
    """bench.speculation --quick: our plain and Medusa + lookup configurations on two prompts."""
    out = subprocess.run([sys.executable, "-m", "bench.speculation", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "speculation.json").read_text())
    assert list(report["servers"]) == ["ours plain", "ours Medusa + lookup"]
    for srv in report["servers"].values():
        row = srv["levels"][0]
        assert row["streams"] == 1 and row["tokens"] > 0 and row["stream_tok_s"] > 0
    # greedy: the speculative configuration wrote what plain decoding wrote, for both prompts
    assert report["summary"]["greedy_identical_to_plain"] == {"ours Medusa + lookup": "2/2"}
    both = report["servers"]["ours Medusa + lookup"]
    assert set(both["acceptance_by_category"]) == {"chat", "instruction", "code", "prose", "rag", "rewrite"}
    assert (tmp_path / "speculation.md").read_text().startswith("### Mixed prompt set")
