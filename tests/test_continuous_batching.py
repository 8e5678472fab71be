"""The multi-sequence KV cache, the public ``ContinuousBatcher`` and ``create_completion(n=K)``: a sequence decoded in
a batch gives the tokens it gives alone (every quantization type of the synthetic model, and the real model), a
new prompt joins running sequences without stalling them, prefixes are shared, memory comes and goes."""
from __future__ import annotations

import numpy as np
import pytest

from ggml_backend import ContinuousBatcher, Llama
from ggml_backend.generation import SamplingParams
from ggml_backend.model.kv_cache import GROW_CHUNK, KVCache, MultiSequenceCache
from refdata import synthetic_file, synthetic_types

NO_END = {151643: -100.0, 151645: -100.0}   # Qwen's end tokens: every reply runs to max_tokens


@pytest.fixture(scope="module")
def tiny():
    return Llama(str(synthetic_file("q4_0")), n_ctx=128, verbose=False)


def _prompts(n_vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    # lengths 3..17 (integer kernels) and one of 60 (a batch of its own on the BLAS path)
    lengths = [3, 5, 8, 11, 13, 17, 4, 60]
    return [[1] + rng.integers(3, n_vocab, n - 1).tolist() for n in lengths]


def _decode(llm, prompts, **kwargs) -> list[list[int]]:
    batcher = ContinuousBatcher(llm)
    sequences = [batcher.sequences[batcher.add(p, max_tokens=6, temperature=0, stop_tokens=[], **kwargs)]
                 for p in prompts]
    events = list(batcher.run())
    assert {e.seq_id for e in events if e.finish_reason} == {s.id for s in sequences}
    assert len(batcher.cache) == 0   # every sequence's memory went back
    return [s.generated for s in sequences]


# --- the cache ---------------------------------------------------------------------------------------------
def test_kv_cache_grows_in_chunks_and_gives_memory_back():
    cache = KVCache(2, 2 * GROW_CHUNK + 10, 2, 64, 64, "q8_0", "f16")
    assert cache.capacity == GROW_CHUNK
    full = KVCache(2, 2 * GROW_CHUNK + 10, 2, 64, 64, "q8_0", "f16", capacity=2 * GROW_CHUNK + 10)
    assert cache.max_nbytes == full.max_nbytes == full.nbytes > cache.nbytes
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((GROW_CHUNK + 5, 2, 64)).astype(np.float32)
    for layer in range(2):
        cache.store(layer, 0, rows, rows)
    cache.n_past = len(rows)
    assert cache.capacity == 2 * GROW_CHUNK            # doubled, in whole chunks
    before = cache.k.read(1, 0, len(rows))
    cache.store(0, len(rows), rows[:GROW_CHUNK], rows[:GROW_CHUNK])
    assert cache.capacity == cache.n_ctx               # never past n_ctx
    assert np.array_equal(cache.k.read(1, 0, len(rows)), before)   # growing kept the values
    with pytest.raises(ValueError, match="do not fit"):
        cache.store(0, cache.n_ctx, rows[:1], rows[:1])
    cache.release()
    assert cache.nbytes == 0 and cache.n_past == 0


def test_multi_sequence_cache_add_remove_truncate_copy_prefix(tiny):
    model = tiny.model
    caches = MultiSequenceCache(model, 64, "f16", "q8_0")
    a = caches.add("a")
    assert a.nbytes == 0 and caches.nbytes == 0                 # nothing allocated before it is used
    model.forward_many([([1, 5, 9, 12, 7], a)])
    assert caches.n_past("a") == 5 and caches.nbytes > 0
    with pytest.raises(ValueError, match="exists"):
        caches.add("a")
    b = caches.copy_prefix("a", "b", 3)                          # llama.cpp's seq_cp
    assert caches.n_past("b") == 3
    for il in range(model.hp.n_layer):
        assert np.array_equal(b.k.read(il, 0, 3), a.k.read(il, 0, 3))
        assert np.array_equal(b.v.read(il, 0, 3), a.v.read(il, 0, 3))
    # the copy continues as if it had evaluated the prefix itself
    fresh = model.new_cache(64, "f16", "q8_0")
    expected = model.forward_many([([1, 5, 9, 4], fresh)])[0]
    assert np.array_equal(model.forward_many([([4], b)])[0], expected)
    caches.truncate("a", 2)
    assert caches.n_past("a") == 2 and caches.n_past("b") == 4
    held = caches.nbytes
    caches.remove("a")
    assert caches.nbytes < held and "a" not in caches and list(caches) == ["b"]
    with pytest.raises(KeyError):
        caches.remove("a")
    caches.remove("b")
    assert caches.nbytes == 0 and len(caches) == 0


# --- batch invariance --------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", synthetic_types())
def test_synthetic_sequences_in_a_batch_of_8_decode_as_alone(type_name):
    llm = Llama(str(synthetic_file(type_name)), n_ctx=96, verbose=False)
    prompts = _prompts(llm.n_vocab())
    together = _decode(llm, prompts)
    alone = [_decode(llm, [p])[0] for p in prompts]
    assert together == alone
    # and as the engine's own generation
    greedy = SamplingParams(temperature=0)
    assert together[0] == list(llm.generate_tokens(prompts[0], params=greedy, max_tokens=6, stop_tokens=[]))
    assert together[-1] == list(llm.generate_tokens(prompts[-1], params=greedy, max_tokens=6, stop_tokens=[]))


def test_real_model_sequences_in_a_batch_of_8_decode_as_alone():
    llm = Llama(n_ctx=128, verbose=False)
    prompts = [f"{i} + {i} =" for i in range(7)] + ["def reverse(s):"]
    batcher = ContinuousBatcher(llm)
    sequences = [batcher.sequences[batcher.add(p, max_tokens=4, temperature=0, logit_bias=NO_END,
                                                repeat_penalty=1.0)]  # create_completion's default
                 for p in prompts]
    list(batcher.run())
    assert batcher.passes < 4 * len(prompts)    # they shared passes
    for seq, prompt in zip(sequences, prompts):
        alone = llm.create_completion(prompt, max_tokens=4, temperature=0, logit_bias=NO_END)
        assert seq.text == alone["choices"][0]["text"] and seq.finish_reason == "length"


# --- joining, sharing, cancelling --------------------------------------------------------------------------
def test_a_new_prompt_joins_without_stalling_the_running_sequences(tiny):
    batcher = ContinuousBatcher(tiny, n_batch=16)
    running = batcher.add([1, 7, 8, 9], max_tokens=20, temperature=0, stop_tokens=[])
    list(batcher.step() for _ in range(2))
    late = batcher.add([1] + list(range(10, 40)), max_tokens=3, temperature=0, stop_tokens=[])   # 2 batches of 16
    late_seq = batcher.sequences[late]
    passes = batcher.passes
    # the late prompt is evaluated in its two batches, each joined to the running sequence's decode pass
    assert [e.seq_id for e in batcher.step()] == [running]
    assert [e.seq_id for e in batcher.step()] == [running, late]
    assert batcher.passes == passes + 2
    rest = list(batcher.run())
    assert any(e.seq_id == running and e.finish_reason == "length" for e in rest)
    assert late_seq.generated == _decode(tiny, [[1] + list(range(10, 40))])[0][:3]


def test_shared_prefix_is_copied_not_evaluated_and_gives_the_same_tokens(tiny):
    prompt = [1] + list(range(20, 40))
    batcher = ContinuousBatcher(tiny)
    a = batcher.add(prompt, max_tokens=5, temperature=0, stop_tokens=[])
    b = batcher.add(prompt, max_tokens=5, temperature=0, stop_tokens=[], share_prefix_with=a)
    c = batcher.add(prompt[:15] + [3, 4], max_tokens=5, temperature=0, stop_tokens=[], share_prefix_with=a)
    seqs = [batcher.sequences[i] for i in (a, b, c)]
    list(batcher.run())
    # a's prompt once, c's 2 own tokens, then 4 decode tokens each
    assert batcher.tokens_evaluated == len(prompt) + 2 + 3 * 4
    assert seqs[0].generated == seqs[1].generated == _decode(tiny, [prompt])[0][:5]
    assert seqs[2].generated == _decode(tiny, [prompt[:15] + [3, 4]])[0][:5]


def test_cancel_frees_the_sequence_and_the_others_go_on(tiny):
    batcher = ContinuousBatcher(tiny, max_sequences=2)
    a = batcher.add([1, 4, 5], max_tokens=8, temperature=0, stop_tokens=[])
    b = batcher.add([1, 6, 7], max_tokens=8, temperature=0, stop_tokens=[])
    with pytest.raises(ValueError, match="max_sequences"):
        batcher.add([1, 2], max_tokens=2)
    batcher.step()
    held = batcher.cache.nbytes
    batcher.cancel(a)
    assert batcher.cache.nbytes < held and a not in batcher.sequences
    events = list(batcher.run())
    assert {e.seq_id for e in events} == {b} and events[-1].finish_reason == "length"
    with pytest.raises(KeyError):
        batcher.cancel(a)


def test_add_checks_its_arguments(tiny):
    batcher = ContinuousBatcher(tiny)
    with pytest.raises(TypeError, match="unknown"):
        batcher.add([1, 2], temprature=0.5)
    with pytest.raises(TypeError, match="not both"):
        batcher.add([1, 2], params=SamplingParams(), top_k=3)
    with pytest.raises(ValueError, match="empty"):
        batcher.add([])
    with pytest.raises(ValueError, match="out of range|range"):
        batcher.add([1, tiny.n_vocab() + 3])
    with pytest.raises(KeyError, match="share_prefix_with"):
        batcher.add([1, 2], share_prefix_with=99)
    with pytest.raises(ValueError, match="context"):
        batcher.add([1] * 128)
    with pytest.raises(TypeError):
        ContinuousBatcher(tiny, max_sequence=3)
    assert batcher.active == 0 and batcher.step() == []


def test_end_tokens_and_stop_strings_finish_a_sequence(tiny):
    tokens = _decode(tiny, [[1, 4, 5]])[0]
    batcher = ContinuousBatcher(tiny)
    batcher.add([1, 4, 5], max_tokens=6, temperature=0, stop_tokens=[tokens[2]])
    events = list(batcher.run())
    assert [e.token for e in events] == tokens[:3] and events[-1].finish_reason == "stop"
    text = tiny.detokenize(tokens).decode("utf-8", "replace")
    stop = text[len(text) // 2:][:3]
    if stop.strip():   # a stop string: the text ends before it
        batcher.add([1, 4, 5], max_tokens=6, temperature=0, stop_tokens=[], stop=[stop])
        events = list(batcher.run())
        assert events[-1].finish_reason == "stop"
        assert "".join(e.text for e in events) == text[:text.index(stop)]


# --- create_completion(n=K) --------------------------------------------------------------------------------
def test_n_completions_share_the_prompt_and_match_single_ones():
    llm = Llama(n_ctx=128, verbose=False)
    greedy = dict(max_tokens=5, temperature=0, logit_bias=NO_END, logprobs=2)
    single = llm.create_completion("The capital of France is", **greedy)["choices"][0]
    many = llm.create_completion("The capital of France is", n=3, **greedy)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    for choice in many["choices"]:   # greedy: every choice is the single reply, log-probabilities and all
        assert choice["text"] == single["text"] and choice["logprobs"] == single["logprobs"]
    assert many["usage"]["completion_tokens"] == 15
    seeded = dict(max_tokens=6, temperature=1.0, seed=42, logit_bias=NO_END)
    first = llm.create_completion("Once upon a time", n=3, **seeded)
    assert first == {**llm.create_completion("Once upon a time", n=3, **seeded), "id": first["id"],
                     "created": first["created"]}
    assert first["choices"][0]["text"] == llm.create_completion("Once upon a time", **seeded)["choices"][0]["text"]
    chunks = list(llm.create_completion("Once upon a time", n=3, stream=True, **seeded))
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1, 2}
    texts = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)]
    assert texts == [c["text"] for c in first["choices"]]
    with pytest.raises(ValueError):
        llm.create_completion("x", n=0)


def test_more_sequences_than_one_pass_holds(tiny):
    """More decoding sequences than a combined pass carries (max_rows): each step is cut into passes, and a new
    prompt still makes progress every step."""
    rows = tiny.model.batcher.max_rows
    batcher = ContinuousBatcher(tiny, max_sequences=rows + 4)
    prompts = [[1, 3 + i, 9] for i in range(rows + 3)]
    sequences = [batcher.sequences[batcher.add(p, max_tokens=6, temperature=0, stop_tokens=[])] for p in prompts]
    while not all(s.generated for s in sequences):   # their prompts go in a pass's worth per step
        batcher.step()
    late = batcher.sequences[batcher.add([1] + list(range(50, 70)), max_tokens=3, temperature=0, stop_tokens=[])]
    passes = batcher.passes
    batcher.step()
    # rows + 3 decode tokens and the 20-token prompt: two passes, and the prompt is in
    assert batcher.passes == passes + 2 and len(late.generated) == 1
    list(batcher.run())
    assert [s.generated for s in sequences[:2]] == [_decode(tiny, [p])[0] for p in prompts[:2]]
    assert late.generated == _decode(tiny, [[1] + list(range(50, 70))])[0][:3]


def test_a_failing_pass_ends_only_its_own_sequences(tiny, monkeypatch):
    batcher = ContinuousBatcher(tiny)
    short = batcher.add([1, 4, 5], max_tokens=4, temperature=0, stop_tokens=[])
    batcher.step()
    batcher.add([1] + list(range(3, 70)), max_tokens=4, temperature=0, stop_tokens=[])   # a pass of its own
    model = tiny.model

    def broken(tokens, cache, all_logits=False):
        raise MemoryError("no room")
    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(MemoryError):
        batcher.step()
    monkeypatch.undo()
    assert list(batcher.sequences) == [short]    # the long prompt's sequence ended, the other goes on
    events = list(batcher.run())
    assert events[-1].seq_id == short and events[-1].finish_reason == "length"
