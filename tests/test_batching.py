"""Continuous batching (model/batching.py): contexts on one model's weights that decode at the same time share
forward passes, and each gets exactly the numbers it gets alone."""
from __future__ import annotations

import threading

import pytest

from ggml_backend import Llama

NO_END = {151643: -100.0, 151645: -100.0}   # Qwen's end tokens: every reply runs to max_tokens


@pytest.fixture(scope="module")
def qwen():
    return Llama(n_ctx=256, verbose=False)


def _generate(llm, prompt, n=12):
    out = llm.create_completion(prompt, max_tokens=n, temperature=0, logprobs=1, logit_bias=NO_END)
    choice = out["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def test_contexts_decoding_together_share_passes_and_keep_their_numbers(qwen):
    assert qwen.model.batcher is not None   # every weight of the default model is on the SIMD integer kernels
    prompts = [f"Count from {i} to {i + 20}:" for i in range(4)]
    contexts = [qwen.new_context(128) for _ in prompts]
    alone = [_generate(ctx, p) for ctx, p in zip(contexts, prompts)]
    batcher = qwen.model.batcher
    passes, tokens = batcher.passes, batcher.tokens
    together: list = [None] * len(prompts)
    errors: list = []

    def run(i):
        try:
            together[i] = _generate(contexts[i], prompts[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert together == alone   # texts and log-probabilities, bit for bit
    n_passes, n_tokens = batcher.passes - passes, batcher.tokens - tokens
    assert n_tokens / n_passes > 2, f"{n_tokens} tokens in {n_passes} passes: the contexts did not share passes"


def test_a_bad_request_fails_alone(qwen):
    """A context's bad tokens are refused before they join a pass: the others are not touched."""
    ctx = qwen.new_context(64)
    with pytest.raises(ValueError, match="out of range"):
        ctx.model.forward([qwen.n_vocab() + 5], ctx.cache)
    with pytest.raises(ValueError, match="do not fit"):
        ctx.model.forward([1] * 65, ctx.cache)
    assert ctx.cache.n_past == 0
    text, _ = _generate(ctx, "Hello", 4)
    assert text
