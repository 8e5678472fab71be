"""``GGMLEmbeddings``: LangChain embeddings (``langchain_core.embeddings.Embeddings``) on ggml_backend, taking
LangChain's ``LlamaCppEmbeddings`` constructor parameters with the same meaning."""
from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ggml_backend.embeddings import embed_texts, one_vector_pooling

from ._shared import SharedModel, get_shared_model, resolve_model_path


class GGMLEmbeddings(BaseModel, Embeddings):
    """Text embeddings from a GGUF/GGML model file run by ggml_backend (pure Python, CPU): a text's final hidden
    states (after the output norm, as llama.cpp's embeddings), pooled into one vector per text.

    Example:
        .. code-block:: python

            from langchain_ggml import GGMLEmbeddings

            embeddings = GGMLEmbeddings()        # model_path=None: the default Qwen2.5-Coder-0.5B
            vectors = embeddings.embed_documents(["first text", "second text"])
            query = embeddings.embed_query("which text?")

    A drop-in for ``LlamaCppEmbeddings``: the same constructor parameters with the same meaning where they have
    one here (those that tune llama.cpp's memory, ``n_parts``, ``f16_kv``, ``use_mlock``, ``vocab_only``,
    ``n_gpu_layers``, ``device``, are accepted and change nothing: this engine runs on the CPU and keeps the
    weights in a memory map); unknown parameters are an error, as there. One difference: a text is always one
    vector. ``LlamaCppEmbeddings`` on a generative model (whose file names no pooling, so llama.cpp pools none)
    returns one vector per token, flattened into the document list; here such a model is pooled by the mean of its
    tokens (``pooling_type`` chooses otherwise).

    The model is loaded (or found already loaded) at construction, and shared with ``GGMLLLM`` / ``ChatGGML``
    instances of the same ``model_path``, ``n_ctx``, ``n_threads`` and ``n_batch``. Embedding does not touch
    the shared model's KV cache: a generation running on it at the same time goes on undisturbed.
    """

    client: Any = None
    """The loaded ``ggml_backend.Llama`` (set at construction; ``embedding`` enabled on it, as
    ``LlamaCppEmbeddings``' client is a ``Llama(embedding=True)``)."""
    model_path: str | None = None
    """Path of the .gguf / ggml .bin file; None means the default model (Qwen2.5-Coder-0.5B-Instruct)."""
    n_ctx: int = Field(512)
    """Context size of the loaded model (shared with the generation classes)."""
    n_parts: int = Field(-1)
    """Accepted for compatibility (llama.cpp's old model parts); no effect."""
    seed: int = Field(-1)
    """Accepted for compatibility: embeddings do not sample; no effect."""
    f16_kv: bool = Field(False)
    """Accepted for compatibility: keys and values are always kept at float16 precision."""
    logits_all: bool = Field(False)
    """Accepted for compatibility: embeddings compute no logits; no effect."""
    vocab_only: bool = Field(False)
    """Accepted for compatibility; must be False (a vocabulary alone cannot embed)."""
    use_mlock: bool = Field(False)
    """Accepted for compatibility; no effect (the weights stay in a memory map)."""
    n_threads: int | None = Field(None)
    """CPU threads for evaluation; None: all cores."""
    n_batch: int | None = Field(512)
    """Most tokens of one text: longer texts are cut to this many (llama-cpp-python's ``embed(truncate=True)``);
    at most ``n_ctx``. None: 512."""
    n_gpu_layers: int | None = Field(None)
    """Accepted for compatibility; this engine runs on the CPU."""
    verbose: bool = Field(False)
    """Print loading information to stderr (``LlamaCppEmbeddings`` defaults to True, for llama.cpp's log)."""
    device: str | None = Field(None)
    """Accepted for compatibility; this engine runs on the CPU (None or "cpu")."""
    pooling_type: int | str | None = Field(None)
    """How a text's token vectors become one: "mean", "cls", "last" (or llama.cpp's numbers 1, 2, 3); None: the
    model file's ``pooling_type``, else the mean."""
    normalize: bool = Field(False)
    """L2-normalize every vector (``LlamaCppEmbeddings`` does not)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    _pooling: int = PrivateAttr(1)

    @model_validator(mode="after")
    def _load(self) -> "GGMLEmbeddings":
        if self.vocab_only:
            raise ValueError("vocab_only=True loads no weights, so it cannot embed")
        if self.device not in (None, "cpu"):
            raise ValueError(f"device={self.device!r}: this engine runs on the CPU only (None or 'cpu')")
        resolve_model_path(self.model_path)          # a bad path fails here, not at the first call
        shared = self.shared_model
        self._pooling = one_vector_pooling(self.pooling_type, shared.llama.metadata)
        if self.client is None:
            shared.llama.embedding = True
            self.client = shared.llama
        return self

    @property
    def shared_model(self) -> SharedModel:
        """The loaded model these settings name (loaded now if this is its first use in the process)."""
        return get_shared_model(self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                                n_batch=512 if self.n_batch is None else self.n_batch, verbose=self.verbose)

    def _embed(self, texts) -> list:
        return embed_texts(self.client, texts, pooling_type=self._pooling, normalize=self.normalize)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        return self._embed(list(texts)) if texts else []

    def embed_query(self, text: str) -> list[float]:
        """The vector of one text (the same as its document vector: the model has no query prefix)."""
        return self._embed(text)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """``embed_documents`` in a worker thread: the event loop stays free while the model computes."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """``embed_query`` in a worker thread."""
        return await asyncio.to_thread(self.embed_query, text)
