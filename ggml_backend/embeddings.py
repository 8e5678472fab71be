"""Embeddings: a text's final hidden states (after the output norm, before the output matrix: llama.cpp's
``result_norm``), pooled into one vector per text as llama.cpp pools them.

Pooling follows llama.cpp's ``enum llama_pooling_type`` (the same integers llama-cpp-python exposes):

* ``NONE`` (0): no pooling, one vector per token (``embed`` returns a list of lists per text);
* ``MEAN`` (1): the mean of the text's token vectors;
* ``CLS`` (2): the first token's vector;
* ``LAST`` (3): the last token's vector;
* ``RANK`` (4) needs a classifier head (rerankers) that the architectures here do not have: refused.

``UNSPECIFIED`` (-1) means "the model's own": the GGUF key ``<arch>.pooling_type`` when the file has one, else
``NONE``, which is what llama.cpp resolves for a generative model (Qwen2, Llama, Gemma files carry no such key).

Each text is evaluated alone, from position 0, in a KV cache of its own made for the call and dropped after it:

* no context's state is touched: a generation running in the same ``Llama`` (or in a server slot) keeps its KV
  cache, evaluated tokens and logits, and may run at the same time (the forward passes take turns with the
  weights through ``Model.turns``, as contexts do). llama-cpp-python instead clears its one context's KV cache,
  so an embedding there ends a generation's state; saving and restoring the state around each call would cost
  a copy of the whole cache, and a separate ``new_context`` would keep a worker thread and an n_ctx-sized cache
  alive for nothing: a cache the size of the text, made per call, costs only the text's keys and values;
* a text's vector does not depend on the other texts sent with it (llama.cpp decodes several texts in one batch,
  whose size changes its float summation order slightly), so a document embeds to the same vector whether it
  comes alone or in a list.
"""
from __future__ import annotations

import numpy as np

from .quant.matmul import single_threaded_blas

LLAMA_POOLING_TYPE_UNSPECIFIED = -1
LLAMA_POOLING_TYPE_NONE = 0
LLAMA_POOLING_TYPE_MEAN = 1
LLAMA_POOLING_TYPE_CLS = 2
LLAMA_POOLING_TYPE_LAST = 3
LLAMA_POOLING_TYPE_RANK = 4

POOLING_NAMES = {"none": LLAMA_POOLING_TYPE_NONE, "mean": LLAMA_POOLING_TYPE_MEAN, "cls": LLAMA_POOLING_TYPE_CLS,
                 "last": LLAMA_POOLING_TYPE_LAST, "rank": LLAMA_POOLING_TYPE_RANK}


def resolve_pooling(pooling_type, metadata: dict) -> int:
    """The pooling to use: ``pooling_type`` (an int of llama.cpp's enum, or its name), or for UNSPECIFIED the
    model file's ``<arch>.pooling_type``, else NONE."""
    if isinstance(pooling_type, str):
        if pooling_type.lower() not in POOLING_NAMES:
            raise ValueError(f"pooling_type must be one of {sorted(POOLING_NAMES)}, got {pooling_type!r}")
        pooling_type = POOLING_NAMES[pooling_type.lower()]
    if isinstance(pooling_type, bool) or not isinstance(pooling_type, (int, np.integer)):
        raise TypeError(f"pooling_type must be an int (llama.cpp's llama_pooling_type) or a name, "
                        f"got {pooling_type!r}")
    pooling_type = int(pooling_type)
    if pooling_type == LLAMA_POOLING_TYPE_UNSPECIFIED:
        arch = metadata.get("general.architecture", "llama")
        pooling_type = int(metadata.get(f"{arch}.pooling_type", LLAMA_POOLING_TYPE_NONE))
    if pooling_type == LLAMA_POOLING_TYPE_RANK:
        raise ValueError("pooling_type RANK (4) needs a reranker's classifier head, which this model has not")
    if pooling_type not in (LLAMA_POOLING_TYPE_NONE, LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_CLS,
                            LLAMA_POOLING_TYPE_LAST):
        raise ValueError(f"unknown pooling_type {pooling_type} (llama.cpp's: -1 unspecified, 0 none, 1 mean, "
                         f"2 cls, 3 last, 4 rank)")
    return pooling_type


def one_vector_pooling(pooling_type, metadata: dict) -> int:
    """The pooling for callers that need one vector per text (LangChain's ``Embeddings``, OpenAI's
    ``/v1/embeddings``): ``pooling_type`` resolved as ``resolve_pooling`` does (None counts as UNSPECIFIED), except
    that where that gives NONE, MEAN is used: a generative model's file names no pooling, and the mean of its
    tokens' states is the usual sentence vector of a decoder model without an embedding head."""
    asked = LLAMA_POOLING_TYPE_UNSPECIFIED if pooling_type is None else pooling_type
    if asked != LLAMA_POOLING_TYPE_UNSPECIFIED and resolve_pooling(asked, {}) == LLAMA_POOLING_TYPE_NONE:
        raise ValueError("pooling_type NONE gives one vector per token; one vector per text needs mean, cls or "
                         "last pooling")
    resolved = resolve_pooling(asked, metadata)
    return LLAMA_POOLING_TYPE_MEAN if resolved == LLAMA_POOLING_TYPE_NONE else resolved


def texts_of(input) -> list[str]:
    """``input`` as a list of texts: a str, or a list (tuple) of str; anything else is a TypeError."""
    if isinstance(input, str):
        return [input]
    if not isinstance(input, (list, tuple)):
        raise TypeError(f"input must be a str or a list of str, got {type(input).__name__}")
    for i, text in enumerate(input):
        if not isinstance(text, str):
            raise TypeError(f"input[{i}] must be a str, got {type(text).__name__}")
    return list(input)


def hidden_states(model, tokens: list[int]) -> np.ndarray:
    """The final hidden states [n_tokens, n_embd] of ``tokens`` evaluated alone from position 0, in a KV cache
    made for them (no context's state is read or written). Safe from any thread: passes take ``model.turns``."""
    if not tokens:
        raise ValueError("cannot embed an empty text: it has no tokens")
    cache = model.new_cache(len(tokens))
    model.check(tokens, cache)
    with model.turns, single_threaded_blas():   # as Model.forward: our own threads do the parallel work
        return model.forward_many([(tokens, cache)], all_logits=True, output="hidden")[0]


def pool(hidden: np.ndarray, pooling_type: int) -> np.ndarray:
    """One text's vector ([n_embd]) from its hidden states, or the states themselves for NONE."""
    if pooling_type == LLAMA_POOLING_TYPE_NONE:
        return hidden
    if pooling_type == LLAMA_POOLING_TYPE_MEAN:
        return hidden.mean(axis=0, dtype=np.float32)
    if pooling_type == LLAMA_POOLING_TYPE_CLS:
        return hidden[0]
    if pooling_type == LLAMA_POOLING_TYPE_LAST:
        return hidden[-1]
    raise ValueError(f"unsupported pooling_type {pooling_type}")


def normalized(vectors: np.ndarray) -> np.ndarray:
    """L2-normalized along the last axis (a zero vector stays zero), as llama-cpp-python's normalize_embedding."""
    norms = np.linalg.norm(vectors.astype(np.float64), axis=-1, keepdims=True)
    return np.where(norms > 0, vectors / np.where(norms > 0, norms, 1.0), vectors).astype(np.float32)


def embed_tokens(model, token_lists, pooling_type: int, normalize: bool = False) -> list[np.ndarray]:
    """Each token list's embedding: [n_embd] float32 pooled, or [n_tokens, n_embd] for NONE (each row
    normalized on its own when ``normalize``)."""
    out = []
    for tokens in token_lists:
        vector = pool(hidden_states(model, list(tokens)), pooling_type)
        out.append(normalized(vector) if normalize else vector)
    return out


def tokenize_texts(llm, input, truncate: bool = True) -> list[list[int]]:
    """Each text of ``input`` (a str or a list of str) tokenized as llama-cpp-python's ``embed`` does
    (``llm.tokenize(text)``: BOS as the model wants it, special tokens as text), cut to ``llm.n_batch`` tokens
    when ``truncate``, else a longer text is a ValueError (its message is llama-cpp-python's)."""
    token_lists = []
    for text in texts_of(input):
        tokens = llm.tokenize(text.encode("utf-8"))
        if truncate:
            tokens = tokens[:llm.n_batch]
        if len(tokens) > llm.n_batch:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed batch size of {llm.n_batch}")
        token_lists.append(tokens)
    return token_lists


def embed_token_lists(llm, token_lists, pooling_type: int, normalize: bool = False) -> list[np.ndarray]:
    """``embed_tokens`` on the weights of the ``Llama`` context ``llm``, with its thread count (numba's is per
    calling thread, so this is safe from any worker thread)."""
    from .model.session import set_threads
    set_threads(llm.n_threads)
    return embed_tokens(llm.model, token_lists, pooling_type, normalize)


def embed_texts(llm, input, *, pooling_type: int, normalize: bool = False, truncate: bool = True,
                return_count: bool = False):
    """``Llama.embed`` for any ``Llama`` context ``llm`` (the engine's, LangChain's and the server's shared
    models, whatever their ``embedding`` flag), with the pooling given: texts tokenized and cut as
    ``tokenize_texts`` does, embeddings in Python lists of floats; a str gives one embedding, a list a list of
    them; with ``return_count`` also the total number of tokens."""
    token_lists = tokenize_texts(llm, input, truncate)
    vectors = [v.tolist() for v in embed_token_lists(llm, token_lists, pooling_type, bool(normalize))]
    output = vectors[0] if isinstance(input, str) else vectors
    if return_count:
        return output, sum(len(tokens) for tokens in token_lists)
    return output
