"""GGMLEmbeddings: LangChain's standard embeddings tests (langchain-tests) and our own, on the real default model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests is a dev dependency (pip install -e '.[dev]')")

try:
    import langchain_ggml  # noqa: F401
except ImportError:   # not installed as a package yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "langchain"))

from langchain_tests.integration_tests import EmbeddingsIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import EmbeddingsUnitTests  # noqa: E402

from langchain_ggml import GGMLEmbeddings  # noqa: E402

pytestmark = pytest.mark.anyio

N_CTX = 1024   # the same as the other LangChain test modules: one model load for all of them


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TestGGMLEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[GGMLEmbeddings]:
        return GGMLEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"n_ctx": N_CTX}


class TestGGMLEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[GGMLEmbeddings]:
        return GGMLEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"n_ctx": N_CTX}


@pytest.fixture(scope="module")
def embeddings() -> GGMLEmbeddings:
    return GGMLEmbeddings(n_ctx=N_CTX)


def test_one_vector_per_text_mean_pooled_as_the_engine(embeddings):
    texts = ["Hello world", "def add(a, b): return a + b"]
    vectors = embeddings.embed_documents(texts)
    assert len(vectors) == 2 and all(len(v) == embeddings.client.n_embd() for v in vectors)
    per_token = embeddings.client.embed(texts[0])          # the client: a Llama(embedding=True), pooling none
    assert np.allclose(np.mean(per_token, axis=0), vectors[0], atol=1e-5)
    assert embeddings.embed_query(texts[1]) == vectors[1]
    assert embeddings.embed_documents([]) == []


def test_shares_the_generation_model_and_normalizes():
    from langchain_ggml import GGMLLLM
    first = GGMLEmbeddings(n_ctx=N_CTX, normalize=True, pooling_type="last")
    assert first.client is GGMLLLM(n_ctx=N_CTX).shared_model.llama
    assert abs(np.linalg.norm(first.embed_query("Hello world")) - 1.0) < 1e-5


def test_llama_cpp_parameters_and_errors(tmp_path):
    GGMLEmbeddings(n_ctx=N_CTX, n_parts=-1, seed=1, f16_kv=True, use_mlock=False, n_gpu_layers=0, device="cpu",
                   n_threads=None, n_batch=512, verbose=False, logits_all=False)
    with pytest.raises(ValueError):
        GGMLEmbeddings(n_ctx=N_CTX, no_such_parameter=1)
    with pytest.raises((ValueError, FileNotFoundError)):
        GGMLEmbeddings(model_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError):
        GGMLEmbeddings(n_ctx=N_CTX, pooling_type="none")     # one vector per token is not an Embeddings
    with pytest.raises(ValueError):
        GGMLEmbeddings(n_ctx=N_CTX, device="cuda")
