"""Embeddings on the real default model: the second llama.cpp context (backend/embeddings.py) in-process,
the measured facts its batching rests on, and POST /v1/embeddings over HTTP on the live stack."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import httpx
import numpy as np
import pytest
import respx

from app.backend_client import BackendClient
from app.errors import APIError
from backend.config import BackendSettings
from backend.embeddings import FA_TILE_ROWS, MIN_DECODE_ROWS, Decode, EmbedRefused, declared_pooling, plan_decodes
from backend.local import run_requests
from backend.runtime import ModelService
from common.protocol import EmbedRequest, GenerationRequest

SHORT = [
    "The cat sat on the mat.",
    "A dog is running in the park with a red ball.",
    "Stock markets fell sharply today after the announcement.",
    "I like pizza.",
    "What is the capital of France?",
    "Paris is the capital of France.",
    "Hi",
    "Water boils at one hundred degrees Celsius at sea level.",
    "He plays the guitar every evening in the small kitchen of his flat.",
    "Quantum computers use qubits.",
]
LONG = [
    "Once upon a time there was a little village by the sea, where every morning the fishermen came back "
    "with their boats full of fish, and the children ran down to the harbour to see what the nets held. " * k
    for k in (2, 3, 6)
]


@pytest.fixture(scope="module")
def embedder(model_service):
    assert model_service.embedder is not None, model_service.embeddings_off
    return model_service.embedder


def embed(embedder, inputs, **kw) -> np.ndarray:
    return np.array(embedder.embed(EmbedRequest(inputs=inputs, **kw)).vectors, dtype=np.float32)


def test_shape_norm_and_usage(embedder, model_service):
    r = embedder.embed(EmbedRequest(inputs=SHORT[:3]))
    v = np.array(r.vectors)
    assert v.shape == (3, model_service.model.n_embd)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(v, v.astype(np.float32))  # float32 values, carried exactly
    assert r.prompt_tokens == sum(len(model_service.model.tokenize(t, add_special=True)) for t in SHORT[:3])
    assert embedder.pooling == "mean" and embedder.pooling_source == "default"  # the default GGUF declares none


def test_alone_equals_batched(embedder, model_service):
    """Bit-identical vectors whatever else shares the request: tiny inputs (decodes under 8 rows), short
    ones, long ones (64+ tokens: flash attention's tiled kernel), in any order."""
    m = model_service.model
    inputs = [m.tokenize(t, add_special=True) for t in SHORT + LONG] + [[m.bos], [m.bos, 1000, 2000]]
    assert min(map(len, inputs)) == 1 and max(map(len, inputs)) > 3 * FA_TILE_ROWS
    before = embedder.decodes
    together = embed(embedder, inputs)
    assert embedder.decodes - before < len(inputs) / 2  # it did batch
    alone = np.stack([embed(embedder, [x])[0] for x in inputs])
    assert np.array_equal(together, alone)
    order = np.random.default_rng(0).permutation(len(inputs))
    shuffled = embed(embedder, [inputs[i] for i in order])
    assert np.array_equal(shuffled, together[order])
    pairs = embed(embedder, [inputs[0], inputs[-1], inputs[len(SHORT)]])  # short, tiny and long together
    assert np.array_equal(pairs, together[[0, len(inputs) - 1, len(SHORT)]])


def test_the_measured_facts_batching_rests_on(embedder, model_service):
    """Why plan_decodes groups as it does: a decode of fewer than 8 rows, and a sequence of 64 or more
    rows (flash attention's tiled kernel), compute other numbers; within those bounds the padding and
    the other sequences of a decode change nothing. If llama.cpp changes this, revisit plan_decodes."""
    toks = model_service.model.tokenize("The cat sat down.", add_special=True)
    other = model_service.model.tokenize("Stock markets fell sharply today.", add_special=True)
    assert len(toks) < MIN_DECODE_ROWS

    def hidden(seqs, length):
        with embedder.lock:
            return embedder._decode_hidden(seqs, length)[0]

    in_8, in_63 = hidden([toks], MIN_DECODE_ROWS), hidden([toks], FA_TILE_ROWS - 1)
    assert np.array_equal(in_8, in_63)
    assert np.array_equal(in_8, hidden([toks, other, toks], 20))
    assert not np.array_equal(hidden([toks], len(toks)), in_8)  # a decode of fewer than 8 rows
    assert not np.array_equal(hidden([toks], FA_TILE_ROWS), in_8)  # 64 rows: the tiled kernel


def test_plan_decodes():
    lengths = [5, 1, 70, 63, 64, 200, 12, 12, 3, 100, 2, 40]
    plans = plan_decodes(lengths, max_rows=256, max_seqs=4)
    assert sorted(i for p in plans for i in p.indices) == list(range(len(lengths)))
    for p in plans:
        ls = [lengths[i] for i in p.indices]
        assert len(p.indices) <= 4 and len(p.indices) * p.length <= 256
        assert p.length >= max(ls) and len(p.indices) * p.length >= MIN_DECODE_ROWS
        assert all(n < FA_TILE_ROWS for n in ls) or all(n >= FA_TILE_ROWS for n in ls)
        assert (p.length >= FA_TILE_ROWS) == (ls[0] >= FA_TILE_ROWS)
    assert plan_decodes([1], 512, 16) == [Decode((0,), MIN_DECODE_ROWS)]
    assert plan_decodes([3, 2], 512, 16) == [Decode((1, 0), 4)]  # 2 x 4 rows: enough
    assert plan_decodes([300, 300], 512, 16) == [Decode((0,), 300), Decode((1,), 300)]


def test_similar_sentences_are_closer(embedder):
    v = embed(embedder, [
        "The cat sat on the mat.", "A cat was sitting on the mat.",
        "Stock markets fell sharply after the announcement.", "Share prices dropped steeply following the news.",
        "How do I bake bread at home?", "What is a good recipe for homemade bread?",
    ])
    sim = v.astype(np.float64) @ v.T.astype(np.float64)
    for a in (0, 2, 4):
        for b in (0, 2, 4):
            if a != b:
                assert sim[a, a + 1] > sim[a, b] and sim[a, a + 1] > sim[a, b + 1], (a, b, sim.round(3))


def test_token_arrays_are_the_text_tokens(embedder, model_service):
    texts = SHORT[:4]
    tokens = [model_service.model.tokenize(t, add_special=True) for t in texts]
    assert np.array_equal(embed(embedder, tokens), embed(embedder, texts))
    r = embedder.embed(EmbedRequest(inputs=tokens))
    assert r.prompt_tokens == sum(map(len, tokens))


@pytest.mark.parametrize("inputs, code, param, says", [
    ([""], "invalid_request", "input", "empty string"),
    (["fine", ""], "invalid_request", "input", "input[1]"),
    ([[]], "invalid_request", "input", "empty token array"),
    ([[2, 262144]], "invalid_request", "input", "outside the vocabulary"),
    ([[2, -1]], "invalid_request", "input", "outside the vocabulary"),
    (["word " * 600], "context_length_exceeded", "input", "at most 512 tokens"),
    (["\ud800"], "invalid_request", "input", "lone surrogate"),
])
def test_refusals(embedder, inputs, code, param, says):
    with pytest.raises(EmbedRefused) as e:
        embedder.embed(EmbedRequest(inputs=inputs))
    assert (e.value.error.code, e.value.error.param) == (code, param) and says in e.value.error.message


def test_dimensions(embedder):
    assert len(embedder.embed(EmbedRequest(inputs=["x y"], dimensions=embedder.n_embd)).vectors[0]) == embedder.n_embd
    with pytest.raises(EmbedRefused) as e:
        embedder.embed(EmbedRequest(inputs=["x y"], dimensions=256))
    assert e.value.error.param == "dimensions" and str(embedder.n_embd) in e.value.error.message


def test_generation_is_untouched(embedder, model_service):
    """The engine's own context and numbers: a greedy completion with logprobs is the same while the
    embeddings context runs on another thread."""
    ids = iter(range(1000))

    def completion():
        r = GenerationRequest(id=f"emb-gen-{next(ids)}", prompt="The capital of France is", max_tokens=12,
                              temperature=0.0, logprobs=1)
        choice = run_requests(model_service, [r])[r.id].choices[0]
        return choice.token_ids, [(lp.token_id, lp.logprob) for lp in choice.logprobs]

    quiet = completion()
    stop = threading.Event()

    def keep_embedding():
        while not stop.is_set():
            embedder.embed(EmbedRequest(inputs=SHORT))

    t = threading.Thread(target=keep_embedding)
    t.start()
    try:
        busy = completion()
    finally:
        stop.set()
        t.join()
    assert busy == quiet


def test_off_is_refused_with_a_reason():
    service = ModelService(BackendSettings(embeddings=False))  # not loaded: no embedder
    with pytest.raises(EmbedRefused) as e:
        asyncio.run(service.embed(EmbedRequest(inputs=["x"])))
    assert (e.value.error.code, e.value.error.param) == ("unsupported", "model") and "EMBEDDINGS=false" in e.value.error.message


class _Meta:
    def __init__(self, pooling: str | None):
        self.pooling = pooling

    def meta(self, key: str) -> str | None:
        return {"general.architecture": "gemma3", "gemma3.pooling_type": self.pooling}.get(key)


def test_declared_pooling():
    assert declared_pooling(_Meta(None)) is None
    assert declared_pooling(_Meta("0")) is None  # NONE: nothing declared worth using
    assert [declared_pooling(_Meta(str(k))) for k in (1, 2, 3)] == ["mean", "cls", "last"]
    with pytest.raises(Exception, match="rank pooling"):
        declared_pooling(_Meta("4"))


def test_a_gguf_that_declares_pooling(embedder, model_service, tmp_path):
    """The same weights with `gemma3.pooling_type = 1` (mean) in the GGUF: llama.cpp pools, one input per
    decode, and the vectors match our own mean pooling up to float rounding."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from backend.embeddings import Embedder
    from backend.llama_model import ContextConfig, LlamaModel

    src = model_service.model.path
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    dst = tmp_path / "pooled.gguf"
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, {f"{arch}.pooling_type": MetadataDetails(gguf.GGUFValueType.UINT32, 1)}, [])
    del reader
    model = LlamaModel(dst, ContextConfig(256, 1, 2, 64, False))
    try:
        pooled = Embedder(model, 128, 128, 2)
        try:
            assert (pooled.pooling, pooled.pooling_source, pooled.llama_pools) == ("mean", "gguf", True)
            # 8+ tokens each: llama.cpp decodes them alone, and a decode of fewer rows computes other numbers
            texts = [t for t in SHORT if len(model.tokenize(t, add_special=True)) >= MIN_DECODE_ROWS][:4]
            ours, theirs = embed(embedder, texts), embed(pooled, texts)
            assert np.allclose(theirs, ours, atol=2e-5), np.abs(theirs - ours).max()
            assert np.array_equal(embed(pooled, texts[1:2])[0], theirs[1])  # one decode per input: alone = batched
        finally:
            pooled.close()
    finally:
        model.close()


# --- the API layer ---------------------------------------------------------------------------------------


def test_backend_refusals_become_typed_api_errors():
    async def go(body: dict, status: int = 400) -> APIError:
        with respx.mock(base_url="http://model") as mock:
            mock.post("/embed").mock(return_value=httpx.Response(status, json=body))
            client = BackendClient("http://model")
            try:
                await client.embed(EmbedRequest(inputs=["x"]))
            except APIError as e:
                return e
            finally:
                await client.aclose()
        raise AssertionError("no error")

    e = asyncio.run(go({"message": "off", "code": "unsupported", "param": "model"}))
    assert (e.status, e.code, e.param) == (400, "embeddings_unavailable", "model")
    e = asyncio.run(go({"message": "long", "code": "context_length_exceeded", "param": "input"}))
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "input")
    e = asyncio.run(go({"status": "draining"}, status=503))
    assert e.status == 503


def post(live_stack, body: dict) -> httpx.Response:
    # json.dumps escapes non-ASCII, so a lone surrogate travels as \ud800, as a client's JSON may carry it
    return httpx.post(f"{live_stack.base_url}/v1/embeddings", content=json.dumps(body),
                      headers={"content-type": "application/json"}, timeout=120)


def test_http_float_and_base64(live_stack):
    body = {"model": live_stack.model, "input": SHORT[:3]}
    f = post(live_stack, {**body, "encoding_format": "float"})
    b = post(live_stack, {**body, "encoding_format": "base64"})
    assert f.status_code == 200 and b.status_code == 200, (f.text, b.text)
    fj, bj = f.json(), b.json()
    assert fj["object"] == "list" and fj["model"] == live_stack.model
    assert [d["index"] for d in fj["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in fj["data"])
    assert fj["usage"]["prompt_tokens"] == fj["usage"]["total_tokens"] > 3
    floats = np.array([d["embedding"] for d in fj["data"]], dtype=np.float32)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in bj["data"]])
    assert np.array_equal(floats, decoded)
    assert np.allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-6)
    one = post(live_stack, {"model": live_stack.model, "input": SHORT[1]}).json()  # a string: one input
    assert len(one["data"]) == 1 and np.array_equal(np.array(one["data"][0]["embedding"], dtype=np.float32), floats[1])
    tokens = httpx.post(f"{live_stack.backend_url}/tokenize", json={"text": SHORT[1]}).json()["tokens"]
    for given in (tokens, [tokens]):  # a token array, and a list of token arrays
        r = post(live_stack, {"model": live_stack.model, "input": given}).json()
        assert np.array_equal(np.array(r["data"][0]["embedding"], dtype=np.float32), floats[1])
    assert post(live_stack, {**body, "dimensions": floats.shape[1]}).status_code == 200


@pytest.mark.parametrize("change, status, param, code", [
    ({"input": []}, 400, "input", None),
    ({"input": ""}, 400, "input", None),
    ({"input": ["ok", ""]}, 400, "input", None),
    ({"input": [[2, 99999999]]}, 400, "input", None),
    ({"input": ["ok", 5]}, 400, "input", None),
    ({"input": [True, True]}, 400, "input", None),  # strict types: a boolean is not a token id
    ({"input": [[2, -1]]}, 400, "input", None),
    ({"dimensions": True}, 400, "dimensions", None),
    ({"input": ["ok", "\ud800"]}, 400, "input", None),
    ({"input": "word " * 600}, 400, "input", "context_length_exceeded"),
    ({"dimensions": 3}, 400, "dimensions", None),
    ({"encoding_format": "int8"}, 400, "encoding_format", None),
    ({"model": "no-such-model"}, 404, "model", "model_not_found"),
])
def test_http_errors_in_the_envelope(live_stack, change, status, param, code):
    r = post(live_stack, {"model": live_stack.model, "input": "hello", **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param or err["param"].startswith(f"{param}[")  # a mixed list: pydantic names an item
    assert err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code
