"""The inference session below ``Llama`` (model/session.py): it alone knows which kernel path a batch takes, and
owns the context's state; the layers above ask it instead of reading kernel thresholds or private fields."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ggml_backend import Llama
from ggml_backend.model import session as S
from ggml_backend.quant.matmul import BLAS_MIN_TOKENS
from refdata import synthetic_file, synthetic_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm():
    return Llama(str(synthetic_file("q4_0")), n_ctx=160, n_batch=64, verbose=False, type_v="q8_0")


def test_batches_and_paths():
    assert S.eval_batches(0, 130, 64) == [(0, 43), (43, 86), (86, 130)]   # near-equal, no short tail
    assert S.eval_batches(5, 5, 64) == []
    assert S.runs_alone(BLAS_MIN_TOKENS) and not S.runs_alone(BLAS_MIN_TOKENS - 1)


def test_the_session_records_how_each_position_was_computed(llm):
    session = llm.session
    sequence = (synthetic_json()["token_sequence"] * 4)[:100]
    llm.reset()
    llm.eval(sequence[:60])          # one batch on the BLAS path
    llm.eval(sequence[60:64])        # a few tokens on the integer kernels
    assert session.n_tokens == llm.n_tokens == 64 and llm.input_ids is session.input_ids
    assert list(session.numerics[:64]) == [S.BATCH_NUMERICS] * 60 + [S.INT_NUMERICS] * 4
    # a long prompt reuses only batch positions and leaves the batch path its tokens; a short one, none of them
    assert session.reusable_prefix(sequence[:100]) == 100 - BLAS_MIN_TOKENS
    assert session.reusable_prefix(sequence[:30]) == 0
    assert session.reuse_prefix(sequence[:100]) == 52 and session.n_tokens == 52
    session.context_shift(0)
    assert session.n_tokens == 26 and set(session.numerics[:26]) == {S.NO_FRESH_NUMERICS}
    with pytest.raises(ValueError, match="cannot keep 30 of 26"):
        session.truncate(30)
    state = llm.save_state()
    assert type(state) is S.SessionState and state.n_tokens == 26
    llm.reset()
    llm.load_state(state)
    assert session.n_tokens == 26 and np.array_equal(session.tokens, state.input_ids)


def test_sequence_caches_come_from_the_session(llm):
    caches = llm.session.sequence_cache()
    cache = caches.add(0)
    assert cache.n_ctx == llm.n_ctx() and (cache.k.kind, cache.v.kind) == ("f16", "q8_0")
    assert llm.session.sequence_cache(32, type_k="f32").add("a").k.kind == "f32"


def test_nothing_above_the_model_reads_kernel_thresholds_or_the_llamas_private_state():
    # the layers above model/ ask the session (runs_alone, eval_batches); the kernels (quant/, cuda/) and model/
    # are where the threshold lives
    offenders = []
    for path in list((ROOT / "ggml_backend").rglob("*.py")) + list((ROOT / "integrations").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(("ggml_backend/model/", "ggml_backend/quant/", "ggml_backend/cuda/")):
            continue
        text = path.read_text(encoding="utf-8")
        if "BLAS_MIN_TOKENS" in text or re.search(r"\b(llm|llama|self\.llm)\._(lock|scheduler|kv|numerics|"
                                                  r"last_logits|all_logits|cache_types|make_sampler)\b", text):
            offenders.append(relative)
    assert offenders == []
