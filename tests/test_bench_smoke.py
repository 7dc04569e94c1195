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
