"""The Vicuna-7B preset end to end on artefacts the test makes: a tiny random llama checkpoint in
Hugging Face format and Medusa heads in FasterDecoding's layout go through the same functions as the
real download (HF -> GGUF with llama.cpp's converter, Q8_0 with llama_model_quantize, heads checked
and converted), then the model server serves the preset and answers a chat request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.config import BackendSettings
from backend.local import run_requests
from backend.preset import PRESETS, PresetError, load_preset, prepare
from backend.runtime import ModelService
from backend.server import create_app
from common.protocol import ChatMessage, GenerationRequest
from tests.tiny_llama import hf_logits, make_fd_heads, make_hf_llama


def hub(root):
    """The two repositories as the download would leave them: a tiny HF llama and random heads in
    FasterDecoding's layout."""
    preset = PRESETS["vicuna-7b"]
    return {preset.base_repo: make_hf_llama(root / "hub" / "vicuna"),
            preset.heads_repo: make_fd_heads(root / "hub" / "medusa", vocab=320, n_heads=3)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset")
    repos = hub(root)
    fetched = []

    def fetch(repo: str):
        fetched.append(repo)
        return repos[repo]

    meta = prepare(PRESETS["vicuna-7b"], root / "cache", fetch=fetch)
    return root / "cache", json.loads(meta.read_text()), fetched, repos


def test_prepare_converts_quantises_and_records_the_preset(prepared):
    from gguf import GGMLQuantizationType, GGUFReader

    cache, meta, fetched, _ = prepared
    assert fetched == ["lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3"]
    types = {t.name: t.tensor_type for t in GGUFReader(meta["model"]).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert not (cache / "vicuna-7b" / "model-f16.gguf").exists()
    assert meta["chat_template"] == "vicuna" and json.loads(meta["medusa_tree"]) == [[0], [0, 0]]
    assert load_preset("vicuna-7b", cache) == meta
    # Running again finds everything in place and fetches nothing.
    prepare(PRESETS["vicuna-7b"], cache, fetch=lambda repo: pytest.fail(f"fetched {repo} again"))


def test_the_converted_model_and_heads_compute_what_the_originals_compute(prepared):
    """The GGUF (HF -> F16 -> Q8_0) gives the logits Hugging Face transformers gives for the
    checkpoint, up to Q8_0 rounding; the converted heads give the torch heads' logits."""
    import torch

    from backend.llama_model import ContextConfig, LlamaModel
    from backend.spec.heads import load_heads
    from backend.preset import convert_python

    cache, meta, _, repos = prepared
    base_dir, heads_dir = repos["lmsys/vicuna-7b-v1.3"], repos["FasterDecoding/medusa-vicuna-7b-v1.3"]
    ids = [1, 19, 29, 77, 150, 200, 250, 319]
    expected = hf_logits(convert_python(), base_dir, ids)
    model = LlamaModel(meta["model"], ContextConfig(64, 1, 2, 64, False))
    try:
        assert model.tokenize("The quick brown fox", add_special=True)[0] == 1  # the same vocabulary, BOS first
        model.batch_clear()
        for i, t in enumerate(ids):
            model.batch_add(t, i, 0, True)
        assert model.decode() == 0
        got = np.stack([model.logits(i).astype(np.float64) for i in range(len(ids))])
    finally:
        model.close()
    assert got.shape == expected.shape
    # Q8_0 moves a logit by ~1.5% of the largest here; a random model has near ties, so the top
    # token must be one HF ranks within that rounding of its own top.
    tol = 0.03 * np.abs(expected).max()
    assert np.abs(got - expected).max() < tol
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(got, expected)) > 0.999
    assert all(row[top] >= row.max() - 2 * tol for row, top in zip(expected, got.argmax(axis=1)))

    sd = torch.load(heads_dir / "medusa_lm_head.pt")
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    ours = load_heads(meta["medusa_heads"], 64, 320).logits(x)
    for h in range(3):
        t = torch.tensor(x)
        t = t + torch.nn.functional.silu(t @ sd[f"{h}.0.linear.weight"].float().T + sd[f"{h}.0.linear.bias"].float())
        np.testing.assert_allclose(ours[h], (t @ sd[f"{h}.1.weight"].float().T).numpy(), rtol=1e-4, atol=1e-4)


def test_the_preset_serves_with_medusa_and_the_vicuna_template(prepared):
    cache, meta, _, _ = prepared
    common = dict(preset="vicuna-7b", model_cache=str(cache), ctx_size=256, n_parallel=2, threads=2, prompt_lookup="off")
    service = ModelService(BackendSettings(**common))
    plain = ModelService(BackendSettings(**common, medusa_heads="none"))
    service.load()
    plain.load()
    try:
        assert service.error is None, service.error
        info = TestClient(create_app(service.settings, service)).get("/info").json()
        assert info["name"] == "vicuna-7b" and info["chat_template_source"] == "vicuna"
        assert info["medusa"] is True and info["medusa_report"]["heads"] == 3  # counted from the keys
        chat = [ChatMessage(role="user", content="Hello, who are you?")]
        reqs = lambda: [GenerationRequest(id="c", messages=chat, max_tokens=24, temperature=0.0, ignore_eos=True)]
        steps, tokens = service.speculator.stats.steps, service.speculator.stats.tokens
        with_heads = run_requests(service, reqs())["c"].choices[0]
        without = run_requests(plain, reqs())["c"].choices[0]
        assert len(with_heads.token_ids) == 24 and with_heads.token_ids == without.token_ids
        # It speculated: every step after the first verified a draft. (Random heads on a random model
        # are not accepted; acceptance is covered on the real model in test_medusa_engine.py.)
        assert service.speculator.stats.steps - steps >= 20 and service.speculator.stats.tokens - tokens >= 20
        with TestClient(create_app(service.settings, service)) as client:
            lines = client.post("/generate", json={"requests": [
                {"id": "h", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": True}
            ]}).text.splitlines()
        events = [json.loads(line) for line in lines]
        assert events[0]["type"] == "prompt" and events[-1]["type"] == "done"
    finally:
        for s in (service, plain):
            if s.engine:
                s.engine.shutdown()


def test_an_interrupted_preparation_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Killed while quantising, then while fetching the heads: each run redoes only what is missing."""
    import backend.preset as preset_module

    repos = hub(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "cache" / "vicuna-7b"
    fetched = []

    def fetch(repo: str):
        fetched.append(repo)
        if repo.startswith("FasterDecoding") and len(fetched) == 2:
            raise KeyboardInterrupt  # the second run dies while fetching the heads
        return repos[repo]

    def dies_quantising(*a, **k):
        raise KeyboardInterrupt

    real_quantize = preset_module.quantize
    monkeypatch.setattr(preset_module, "quantize", dies_quantising)
    with pytest.raises(KeyboardInterrupt):
        prepare(PRESETS["vicuna-7b"], cache, fetch=fetch)
    assert (out / "model-f16.gguf").exists() and not (out / "model-q8_0.gguf").exists()
    f16_made = (out / "model-f16.gguf").stat().st_mtime_ns
    monkeypatch.setattr(preset_module, "quantize", real_quantize)
    with pytest.raises(KeyboardInterrupt):
        prepare(PRESETS["vicuna-7b"], cache, fetch=fetch)  # quantises from the F16 it kept: no new download
    assert fetched == ["lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3"]
    assert (out / "model-q8_0.gguf").exists() and not (out / "model-f16.gguf").exists()
    assert not (out / "heads.safetensors").exists() and not (out / "preset.json").exists()
    q8_made = (out / "model-q8_0.gguf").stat().st_mtime_ns
    meta = json.loads(prepare(PRESETS["vicuna-7b"], cache, fetch=fetch).read_text())
    assert fetched[2:] == ["FasterDecoding/medusa-vicuna-7b-v1.3"]  # only the heads, again
    assert (out / "model-q8_0.gguf").stat().st_mtime_ns == q8_made and f16_made
    assert load_preset("vicuna-7b", cache) == meta and (out / "heads.safetensors").exists()


def test_an_unprepared_or_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(PresetError, match="not prepared"):
        load_preset("vicuna-7b", tmp_path)
    with pytest.raises(PresetError, match="unknown preset"):
        load_preset("llama-99b", tmp_path)
    service = ModelService(BackendSettings(preset="vicuna-7b", model_cache=str(tmp_path)))
    service.load()
    assert service.health().status == "error" and "python -m backend.preset vicuna-7b" in service.error
