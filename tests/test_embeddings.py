"""Embeddings (``Llama.embed``, ``Llama.create_embedding``) on the real default model (Qwen2.5-Coder-0.5B).

Against llama-cpp-python (skipped where it is not installed): the same texts embedded by both with the same
pooling must agree to a cosine similarity above 0.999 and element-wise within 5% of the vector's largest magnitude.
The hidden states carry outliers near 100, and 8-bit activation quantization turns float summation order into
whole quantization steps (see test_engine_real.py): measured on Zen 4, cosine 0.9994-0.99999 and differences up
to 3% of the largest value, while our own engine's two numerics paths (the integer kernels below 48 tokens, BLAS
above) differ from each other by as much (1.1 on a value of 31 for the second token of "Hello world"). The rest
needs no llama.cpp.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ggml_backend import Llama
from ggml_backend.embeddings import LLAMA_POOLING_TYPE_LAST, LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_NONE
from refdata import real_model

TEXTS = ["Hello world", "def add(a, b):\n    return a + b\n"]
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python (llama_cpp) is not installed: "
                                     "no reference to compare the embeddings with")


@pytest.fixture(scope="module")
def path():
    return str(real_model("qwen"))


@pytest.fixture(scope="module")
def llm(path):
    return Llama(path, embedding=True, n_ctx=512, verbose=False)


@pytest.fixture(scope="module")
def mean_llm(llm):
    other = llm.new_context()          # the same weights, pooled by mean
    other._pooling_type = LLAMA_POOLING_TYPE_MEAN
    return other


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _assert_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    for o, r in zip(ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])):
        assert _cosine(o, r) > 0.999
        assert np.abs(o - r).max() < 0.05 * np.abs(r).max()


# --- against llama-cpp-python ------------------------------------------------------------------------------
@needs_llama_cpp
@pytest.mark.parametrize("pooling", [LLAMA_POOLING_TYPE_NONE, LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_LAST])
def test_embed_matches_llama_cpp(path, pooling):
    import llama_cpp
    kwargs = {} if pooling == LLAMA_POOLING_TYPE_NONE else {"pooling_type": pooling}
    ref = llama_cpp.Llama(path, embedding=True, n_ctx=512, verbose=False, **kwargs)
    ours = Llama(path, embedding=True, n_ctx=512, verbose=False, **kwargs)
    assert ours.pooling_type() == ref.pooling_type() == pooling   # Qwen2's file has no pooling_type: NONE
    _assert_close(ours.embed(TEXTS[0]), ref.embed(TEXTS[0]))
    if pooling != LLAMA_POOLING_TYPE_NONE:   # a list; with NONE each text is a ragged list of token vectors
        for o, r in zip(ours.embed(TEXTS, normalize=True), ref.embed(TEXTS, normalize=True)):
            _assert_close(o, r)
    ours_count, ref_count = ours.embed(TEXTS, return_count=True)[1], ref.embed(TEXTS, return_count=True)[1]
    assert ours_count == ref_count


# --- shapes and semantics -----------------------------------------------------------------------------------
def test_shapes_str_and_list(llm, mean_llm):
    n_embd = llm.n_embd()
    per_token = llm.embed("Hello world")       # pooling NONE: one vector per token
    assert len(per_token) == len(llm.tokenize(b"Hello world")) and all(len(v) == n_embd for v in per_token)
    one = mean_llm.embed("Hello world")
    assert isinstance(one, list) and len(one) == n_embd and isinstance(one[0], float)
    many = mean_llm.embed(TEXTS)
    assert len(many) == 2 and all(len(v) == n_embd for v in many)
    assert mean_llm.embed(["Hello world"]) == [one]
    assert np.allclose(np.mean(per_token, axis=0), one, atol=1e-5)


def test_normalize_and_determinism(mean_llm):
    raw = np.array(mean_llm.embed(TEXTS))
    unit = np.array(mean_llm.embed(TEXTS, normalize=True))
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert np.array_equal(np.array(mean_llm.embed(TEXTS)), raw)
    # a text's vector does not depend on the texts sent with it
    assert mean_llm.embed(TEXTS[1]) == mean_llm.embed(TEXTS)[1]


def test_create_embedding_shape(mean_llm):
    out = mean_llm.create_embedding(TEXTS, model="m")
    assert out["object"] == "list" and out["model"] == "m"
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == mean_llm.n_embd() for d in out["data"])
    n_tokens = sum(len(mean_llm.tokenize(t.encode())) for t in TEXTS)
    assert out["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    single = mean_llm.create_embedding(TEXTS[0])
    assert len(single["data"]) == 1 and single["model"] == mean_llm.model_path


def test_generation_state_untouched(mean_llm):
    mean_llm.reset()
    mean_llm.eval(mean_llm.tokenize(b"Once upon a time"))
    before = mean_llm.save_state()
    logits = mean_llm.eval_logits.copy()
    mean_llm.embed(TEXTS)
    assert mean_llm.n_tokens == len(before.input_ids)
    assert np.array_equal(mean_llm.eval_logits, logits)
    after = mean_llm.save_state()
    assert np.array_equal(after.input_ids, before.input_ids)
    for key in before.kv:
        assert np.array_equal(np.asarray(after.kv[key]), np.asarray(before.kv[key]))
    mean_llm.reset()


def test_truncate(path):
    small = Llama(path, embedding=True, n_ctx=16, n_batch=8, verbose=False, pooling_type="mean")
    long_text = "one two three four five six seven eight nine ten eleven twelve"
    assert len(small.tokenize(long_text.encode())) > 8
    vector, count = small.embed(long_text, return_count=True)
    assert len(vector) == small.n_embd() and count == 8
    with pytest.raises(ValueError, match="exceed batch size"):
        small.embed(long_text, truncate=False)


def test_bad_input(llm, mean_llm, path):
    for bad in (123, None, b"bytes", {"a": 1}):
        with pytest.raises(TypeError):
            mean_llm.embed(bad)
    with pytest.raises(TypeError):
        mean_llm.embed(["ok", 3])
    with pytest.raises(ValueError, match="empty"):
        mean_llm.embed("")
    with pytest.raises(ValueError):
        Llama(path, embedding=True, verbose=False, pooling_type=4)     # RANK needs a classifier head
    with pytest.raises(ValueError):
        Llama(path, embedding=True, verbose=False, pooling_type="max")
    no_embedding = Llama(path, verbose=False)
    with pytest.raises(RuntimeError, match="embedding=True"):
        no_embedding.embed("Hello")
