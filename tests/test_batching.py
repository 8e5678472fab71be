"""Continuous batching (model/batching.py): contexts on one model's weights that decode at the same time share
forward passes, and each gets exactly the numbers it gets alone."""
from __future__ import annotations

import threading
import time

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


def _at_once(calls) -> list:
    """Each call on a thread of its own, all at once: their results (an error in any fails the test)."""
    results: list = [None] * len(calls)
    errors: list = []

    def run(i):
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_contexts_decoding_together_share_passes_and_keep_their_numbers(qwen):
    assert qwen.model.batcher is not None   # every weight of the default model is on the SIMD integer kernels
    prompts = [f"Count from {i} to {i + 20}:" for i in range(4)]
    contexts = [qwen.new_context(128) for _ in prompts]
    alone = [_generate(ctx, p) for ctx, p in zip(contexts, prompts)]
    batcher = qwen.model.batcher
    passes, tokens = batcher.passes, batcher.tokens
    together = _at_once([lambda i=i: _generate(contexts[i], prompts[i]) for i in range(len(prompts))])
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


def test_passes_longer_than_the_active_window_still_gather_every_context(qwen, monkeypatch):
    """A context counts as active from the end of its last pass, not from its submission: with passes longer than
    ACTIVE_S (16 sequences on a loaded 2-core machine), contexts counted from submission had all expired when
    their pass ended, so the first one back ran a pass of its own and every step became two passes. Here each pass
    is made to take ACTIVE_S + 0.05 s (as a slow machine's would). The leader's wait for the active contexts is
    lengthened to 1 s: this test is about whom it waits for, and on a loaded machine (the suite's other worker) a
    context coming back for its next token could miss the usual 60 ms, splitting passes for another reason."""
    from ggml_backend.model import batching
    monkeypatch.setattr(batching, "GATHER_S", 1.0)
    contexts = [qwen.new_context(128) for _ in range(4)]
    sizes: list = []
    forward_many = qwen.model.forward_many

    def slow(items, *args):
        sizes.append(len(items))
        time.sleep(batching.ACTIVE_S + 0.05)
        return forward_many(items, *args)
    monkeypatch.setattr(qwen.model, "forward_many", slow)
    _at_once([lambda i=i: _generate(contexts[i], f"List {i + 3} fruits:", 12) for i in range(len(contexts))])
    # 4 prompts and 11 decode steps each: ideally 12 passes of 4 (a loaded machine's stragglers add a few);
    # counted from submission, each step split in two (passes of 1 and 3: 24)
    assert len(sizes) <= 18, f"passes of {sizes}: the contexts did not stay together"


def test_a_context_waiting_through_a_long_pass_stays_expected_by_the_next():
    """A job submitted early in a pass longer than ACTIVE_S waits past the window; the pass that takes it must still
    count its context as active afterwards (the pass's end renews it), so the pass after waits for it. Before, the
    gathering leader forgot such contexts, and on a loaded machine every other step ran without them."""
    from ggml_backend.model import batching

    class SlowModel:
        turns = threading.Lock()

        def forward_many(self, items, all_logits=False):
            time.sleep(batching.ACTIVE_S + 0.1)
            return [len(tokens) for tokens, _ in items]

    batcher = batching.ForwardBatcher(SlowModel(), max_rows=8)
    first, second = object(), object()
    leader = threading.Thread(target=batcher.forward, args=([1], first))
    leader.start()
    time.sleep(0.02)                      # the first pass is running: this job waits for it to end
    assert batcher.forward([1, 2], second) == 2
    leader.join(10)
    assert id(second) in batcher._last_seen, "the context that waited through a long pass was forgotten"
    batcher.leave(first)
    batcher.leave(second)
    assert not batcher._last_seen
