"""The Vicuna-7B preset end to end on artefacts the test makes: a tiny random llama checkpoint in
Hugging Face format and Medusa heads in FasterDecoding's layout go through the same functions as the
real download (HF -> GGUF with llama.cpp's converter, Q8_0 with llama_model_quantize, heads checked
and converted), then the model server serves the preset and answers a chat request."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from backend.config import BackendSettings
from backend.local import run_requests
from backend.preset import PRESETS, PresetError, load_preset, prepare
from backend.server import ModelService, create_app
from common.protocol import ChatMessage, GenerationRequest
from tests.tiny_llama import make_fd_heads, make_hf_llama


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset")
    base = make_hf_llama(root / "hub" / "vicuna")
    heads = make_fd_heads(root / "hub" / "medusa", vocab=320, n_heads=3)
    preset = PRESETS["vicuna-7b"]
    fetched = []

    def fetch(repo: str):
        fetched.append(repo)
        return {preset.base_repo: base, preset.heads_repo: heads}[repo]

    meta = prepare(preset, root / "cache", fetch=fetch)
    return root / "cache", json.loads(meta.read_text()), fetched


def test_prepare_converts_quantises_and_records_the_preset(prepared):
    from gguf import GGMLQuantizationType, GGUFReader

    cache, meta, fetched = prepared
    assert fetched == ["lmsys/vicuna-7b-v1.3", "FasterDecoding/medusa-vicuna-7b-v1.3"]
    types = {t.name: t.tensor_type for t in GGUFReader(meta["model"]).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert not (cache / "vicuna-7b" / "model-f16.gguf").exists()
    assert meta["chat_template"] == "vicuna" and json.loads(meta["medusa_tree"]) == [[0], [0, 0]]
    assert load_preset("vicuna-7b", cache) == meta
    # Running again finds everything in place and fetches nothing.
    prepare(PRESETS["vicuna-7b"], cache, fetch=lambda repo: pytest.fail(f"fetched {repo} again"))


def test_the_preset_serves_with_medusa_and_the_vicuna_template(prepared):
    cache, meta, _ = prepared
    common = dict(preset="vicuna-7b", model_cache=str(cache), ctx_size=256, n_parallel=2, threads=2)
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
        with_heads = run_requests(service, reqs())["c"].choices[0]
        without = run_requests(plain, reqs())["c"].choices[0]
        assert len(with_heads.token_ids) == 24 and with_heads.token_ids == without.token_ids
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


def test_an_unprepared_or_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(PresetError, match="not prepared"):
        load_preset("vicuna-7b", tmp_path)
    with pytest.raises(PresetError, match="unknown preset"):
        load_preset("llama-99b", tmp_path)
    service = ModelService(BackendSettings(preset="vicuna-7b", model_cache=str(tmp_path)))
    service.load()
    assert service.health().status == "error" and "python -m backend.preset vicuna-7b" in service.error
