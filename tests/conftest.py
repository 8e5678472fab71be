"""Fixtures shared by the test files: the model files, their tokenizers, the engine and the default server.

Session-scoped where sharing is safe: a path or a tokenizer has no state; ``qwen_engine`` is only asked for
greedy completions and tokens (each call starts from its own prompt, and a reused prefix gives the same numbers as
a fresh run), and ``default_server`` is the same app every server test file started on its own (tests that need
another configuration still start their own). A test that changes an object's lasting settings (``set_cache``,
``set_seed``, a grammar on the context) must build its own instead of using these.
"""
from __future__ import annotations

import os

import pytest

# No compile helper processes (ggml_backend/compile_helpers.py) beside the test workers, which already keep every
# core busy; test_compile_helpers.py starts them itself.
os.environ.setdefault("GGML_BACKEND_COMPILE_HELPERS", "0")

from refdata import real_model, synthetic_file


@pytest.fixture(scope="session")
def qwen_path():
    """The default model (Qwen2.5-Coder-0.5B-Instruct, q4_K_M); skips when it is not installed."""
    return real_model("qwen")


@pytest.fixture(scope="session")
def gemma_path():
    """The Gemma 3 model; skips when it is not installed."""
    return real_model("gemma")


@pytest.fixture(scope="session")
def tiny_path():
    """The tiny synthetic Llama in q4_0 (one vocabulary in every type); skips without the reference data."""
    return synthetic_file("q4_0")


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_path):
    """The default model's tokenizer alone (no weights): byte-level BPE, 151,936 tokens."""
    from ggml_backend.formats import load
    from ggml_backend.model.validate import build_tokenizer
    return build_tokenizer(load(str(qwen_path)))


@pytest.fixture(scope="session")
def qwen_engine(qwen_path):
    """The default model with one server slot's context (2048), for the replies the servers must equal."""
    from ggml_backend import Llama
    return Llama(str(qwen_path), n_ctx=2048, verbose=False)


@pytest.fixture(scope="session")
def default_server(qwen_path):
    """(base_url, app) of ``ggml-backend serve`` with its defaults as the server tests use them: the default model
    as 'qwen', 2 slots (server_fixtures.running_server); one for the whole session, shut down at its end."""
    pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn, sse-starlette: pip install -e "
                                          "'.[server]') is not installed")
    pytest.importorskip("uvicorn", reason="the server extra is not installed")
    from server_fixtures import running_server
    with running_server() as (url, app):
        yield url, app
