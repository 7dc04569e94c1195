"""Embeddings through real clients against the live stack: the OpenAI SDK (its default base64 and
`float`), LangChain `OpenAIEmbeddings` and LlamaIndex `OpenAILikeEmbedding`; each vector is the one the
SDK gets for the same text."""

from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.openai_like import OpenAILikeEmbedding

TEXTS = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply today."]


@pytest.fixture(scope="module")
def sdk(live_stack):
    return openai.OpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.fixture(scope="module")
def expected(sdk, live_stack) -> np.ndarray:
    return vectors(sdk.embeddings.create(model=live_stack.model, input=TEXTS, encoding_format="float"))


def test_openai_sdk(sdk, live_stack, expected):
    r = sdk.embeddings.create(model=live_stack.model, input=TEXTS)  # the SDK asks for base64 and decodes it
    assert np.array_equal(vectors(r), expected)
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == live_stack.model
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)
    one = sdk.embeddings.create(model=live_stack.model, input=TEXTS[1], dimensions=expected.shape[1])
    assert np.array_equal(vectors(one)[0], expected[1])
    sim = expected.astype(np.float64) @ expected.T.astype(np.float64)
    assert sim[0, 1] > sim[0, 2]


def test_openai_sdk_async(live_stack, expected):
    async def go():
        async with openai.AsyncOpenAI(base_url=f"{live_stack.base_url}/v1", api_key="unused", max_retries=0) as client:
            rs = await asyncio.gather(*(client.embeddings.create(model=live_stack.model, input=t) for t in TEXTS))
        return np.stack([vectors(r)[0] for r in rs])

    assert np.array_equal(asyncio.run(go()), expected)  # concurrent requests, each alone: the same vectors


def test_openai_sdk_errors(sdk, live_stack):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.embeddings.create(model=live_stack.model, input=TEXTS, dimensions=8)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.embeddings.create(model=live_stack.model, input="")
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="text-embedding-3-small", input="hi")


def test_langchain(live_stack, expected):
    # check_embedding_ctx_length=False: by default LangChain tokenizes with tiktoken (OpenAI's
    # vocabulary, downloaded on first use) and sends those token ids, which mean nothing to this model.
    emb = OpenAIEmbeddings(model=live_stack.model, base_url=f"{live_stack.base_url}/v1", api_key="unused",
                           check_embedding_ctx_length=False, max_retries=0)
    assert np.array_equal(np.array(emb.embed_documents(TEXTS), dtype=np.float32), expected)
    assert np.array_equal(np.array(emb.embed_query(TEXTS[2]), dtype=np.float32), expected[2])
    assert np.array_equal(np.array(asyncio.run(emb.aembed_documents(TEXTS)), dtype=np.float32), expected)


def test_llamaindex(live_stack, expected):
    emb = OpenAILikeEmbedding(model_name=live_stack.model, api_base=f"{live_stack.base_url}/v1", api_key="unused",
                              embed_batch_size=2, max_retries=0)
    assert np.array_equal(np.array(emb.get_text_embedding_batch(TEXTS), dtype=np.float32), expected)  # two requests
    assert np.array_equal(np.array(emb.get_query_embedding(TEXTS[0]), dtype=np.float32), expected[0])
    assert np.array_equal(np.array(asyncio.run(emb.aget_text_embedding(TEXTS[1])), dtype=np.float32), expected[1])
