"""The server's slot driver (server/slot_driver.py) on the real model: one thread runs every slot's stream, the
slots' tokens share forward passes, each slot gets what it gets alone, and an error or a close in one slot leaves
the others alone. The HTTP side is in test_server_*.py."""
from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("greenlet", reason="the server extra (greenlet) is not installed")

from ggml_backend.server.slot_driver import END, SlotDriver  # noqa: E402

PROMPTS = ["def add(a, b):", "The capital of France is", "1, 2, 3, 4,"]
GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def contexts(qwen_path):
    from ggml_backend import Llama
    first = Llama(str(qwen_path), n_ctx=256, verbose=False)
    return [first] + [first.new_context(256) for _ in PROMPTS[1:]]


async def _drain(run) -> list:
    chunks = []
    while (chunk := await run.next()) is not END:
        chunks.append(chunk)
    return chunks


def _text(chunks) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks)


@pytest.mark.parametrize("combined", [True, False], ids=["combined passes", "passes alone"])
def test_the_slots_share_passes_on_one_thread_and_each_gets_its_own_reply(contexts, combined, monkeypatch):
    """With the model's batcher (the integer kernels) the slots' tokens share passes; without it (float weights, a
    CPU without those kernels; forced here) every pass runs alone, one per slot and step, on the same thread."""
    model = contexts[0].model
    if combined and model.batcher is None:
        pytest.skip(reason="this CPU runs the model without the integer kernels, so passes are not combined "
                           "(model/batching.batch_invariant); the 'passes alone' case runs here")
    if not combined:
        monkeypatch.setattr(model, "batcher", None)
    alone = [_text(contexts[0].create_completion(p, stream=True, **GREEDY)) for p in PROMPTS]
    threads = set()

    def record_thread(input_ids, scores):
        threads.add(threading.get_ident())
        return scores

    async def main():
        driver = SlotDriver()
        runs = [driver.open(llm.create_completion(p, stream=True, logits_processor=record_thread, **GREEDY))
                for llm, p in zip(contexts, PROMPTS)]
        return driver, await asyncio.gather(*[_drain(run) for run in runs])
    driver, results = asyncio.run(main())
    assert [_text(chunks) for chunks in results] == alone
    assert all(chunks[-1]["usage"]["completion_tokens"] == 8 for chunks in results)
    assert len(threads) == 1 and threading.get_ident() not in threads   # every step on the driver's thread
    # 3 prompts, then 7 decode steps of 3 tokens: combined, about one pass per step; alone, one per slot and step
    if combined:
        assert driver.passes <= 10, driver.passes
    else:
        assert driver.passes == 3 * 8, driver.passes


def test_an_error_or_a_close_in_one_slot_leaves_the_others_going(contexts):
    alone = _text(contexts[0].create_completion(PROMPTS[2], stream=True, **GREEDY))
    calls = []

    def fails_on_the_third_token(input_ids, scores):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("a processor that fails")
        return scores

    async def main():
        driver = SlotDriver()
        failing = driver.open(contexts[0].create_completion(PROMPTS[0], stream=True,
                                                            logits_processor=fails_on_the_third_token, **GREEDY))
        closing_stream = contexts[1].create_completion(PROMPTS[1], stream=True, temperature=0, max_tokens=200)
        closing = driver.open(closing_stream)
        going = driver.open(contexts[2].create_completion(PROMPTS[2], stream=True, **GREEDY))
        with pytest.raises(ValueError, match="a processor that fails"):
            await _drain(failing)
        for _ in range(3):
            assert await closing.next() is not END
        closing_stream.close()   # from the event loop, as a client that leaves
        rest = await _drain(closing)
        return rest, await _drain(going)
    rest, going = asyncio.run(main())
    assert len(rest) <= 2   # the token in progress (and the last chunk) at most, not the 200 asked for
    assert _text(going) == alone
    # the closed and the failed slots' models are free again
    assert _text(contexts[1].create_completion(PROMPTS[1], stream=True, **GREEDY))
    assert _text(contexts[0].create_completion(PROMPTS[0], stream=True, **GREEDY))


def test_a_long_prompt_goes_in_between_the_other_slots_steps(qwen_path):
    """A prompt of three BLAS-size batches (n_batch 64) joins while another slot decodes: that slot gets a step
    between the batches instead of waiting for the whole prompt."""
    from ggml_backend import Llama
    first = Llama(str(qwen_path), n_ctx=512, n_batch=64, verbose=False)
    second = first.new_context(512)
    events = []

    def tag(name):
        def record(input_ids, scores):
            events.append(name)
            return scores
        return record
    long_prompt = " ".join(f"item{i}" for i in range(90))   # about 180 tokens: three batches of at most 64
    assert len(first.tokenize(long_prompt.encode())) > 128

    async def main():
        driver = SlotDriver()
        decoding = driver.open(first.create_completion(PROMPTS[0], stream=True, logits_processor=tag("decode"),
                                                       **GREEDY))
        assert await decoding.next() is not END   # it is decoding when the long prompt comes
        prompt = driver.open(second.create_completion(long_prompt, stream=True, logits_processor=tag("prompt"),
                                                      temperature=0, max_tokens=2))
        await asyncio.gather(_drain(decoding), _drain(prompt))
    asyncio.run(main())
    first_of_prompt = events.index("prompt")
    assert events[1:first_of_prompt].count("decode") >= 2, events
    assert first.create_completion(long_prompt, temperature=0, max_tokens=2)["choices"][0]["text"] == \
        second.create_completion(long_prompt, temperature=0, max_tokens=2)["choices"][0]["text"]
