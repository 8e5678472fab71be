"""The llama-cpp-python-shaped API: evaluation state, completions, streaming, stop strings, context shift,
thread safety, and clear errors."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ggml_backend import Llama
from refdata import real_json, real_model, synthetic_file, synthetic_json


@pytest.fixture(scope="module")
def tiny():
    return Llama(str(synthetic_file("q4_0")), n_ctx=64, verbose=False)


@pytest.fixture(scope="module")
def qwen():
    return Llama(str(real_model("qwen")), n_ctx=512, verbose=False)


def test_vocabulary_accessors(tiny, qwen):
    assert (tiny.n_vocab(), tiny.n_ctx(), tiny.token_bos(), tiny.token_eos()) == (4096, 64, 1, 2)
    assert (qwen.n_vocab(), qwen.token_eos()) == (151936, 151645)
    assert qwen.metadata["general.architecture"] == "qwen2"
    text = "def fibonacci(n):\n    return n"
    assert qwen.detokenize(qwen.tokenize(text.encode(), add_bos=False)) == text.encode()


def test_eval_appends_and_scores_hold_the_last_row(tiny):
    sequence = synthetic_json()["token_sequence"]
    tiny.reset()
    tiny.eval(sequence[:10])
    tiny.eval(sequence[10:20])
    assert tiny.n_tokens == 20
    split = tiny.scores[19].copy()
    assert np.array_equal(np.asarray(tiny.eval_logits[-1], np.float32), split)
    tiny.reset()
    tiny.eval(sequence[:10])
    tiny.eval(sequence[10:20])
    np.testing.assert_array_equal(tiny.scores[19], split)       # deterministic
    tiny.reset()
    tiny.eval(sequence[:20])
    # one batch of 20 takes the BLAS path, two of 10 the integer kernels: the same numbers up to float summation
    # order, which this random-weight model amplifies to hundredths
    np.testing.assert_allclose(tiny.scores[19], split, atol=0.1)


def test_save_and_load_state_restore_the_continuation(tiny):
    sequence = synthetic_json()["token_sequence"]
    tiny.reset()
    tiny.eval(sequence[:12])
    state = tiny.save_state()
    tiny.eval(sequence[12:20])
    after = np.asarray(tiny.eval_logits[-1], np.float32)
    tiny.eval(sequence[20:24])           # wander off
    tiny.load_state(state)
    assert tiny.n_tokens == 12
    tiny.eval(sequence[12:20])
    np.testing.assert_array_equal(np.asarray(tiny.eval_logits[-1], np.float32), after)


def test_bad_input_raises_clear_errors(tiny):
    tiny.reset()
    with pytest.raises(ValueError, match="context"):
        tiny.eval(list(range(3, 3 + 65)))
    with pytest.raises(ValueError, match="out of range"):
        tiny.eval([5000])
    with pytest.raises(ValueError, match="exceed context window"):
        tiny.create_completion(list(range(3, 3 + 80)), max_tokens=4)
    with pytest.raises(ValueError):
        tiny.create_completion("hi", top_p=1.5)
    with pytest.raises(ValueError):
        Llama(str(synthetic_file("q4_0")), n_ctx=-1, verbose=False)
    with pytest.raises(FileNotFoundError):
        Llama("/nonexistent/model.gguf", verbose=False)


def test_greedy_completion_matches_llama_cpp_and_reports_usage(qwen):
    case = real_json("qwen")["greedy"][0]
    out = qwen.create_completion(case["prompt"], max_tokens=16, temperature=0)
    expected = qwen.detokenize(case["greedy_tokens"][:16]).decode()
    assert out["choices"][0]["text"] == expected
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(case["prompt_tokens"]), "completion_tokens": 16,
                            "total_tokens": len(case["prompt_tokens"]) + 16}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")


def test_streaming_equals_the_whole_text_and_stop_strings_never_leak(qwen):
    case = real_json("qwen")["greedy"][0]
    whole = qwen.create_completion(case["prompt"], max_tokens=24, temperature=0)["choices"][0]["text"]
    chunks = list(qwen.create_completion(case["prompt"], max_tokens=24, temperature=0, stream=True))
    assert len(chunks) > 5
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # stop in the middle of a word that spans tokens: nothing from the stop string on is emitted
    stop = whole[10:16]
    pieces = [c["choices"][0]["text"] for c in qwen.create_completion(
        case["prompt"], max_tokens=24, temperature=0, stream=True, stop=[stop])]
    assert "".join(pieces) == whole[:whole.index(stop)]
    assert all(stop not in p for p in pieces)


def test_seeded_sampling_is_reproducible(qwen):
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    a = qwen(prompt, max_tokens=12, temperature=1.0, seed=1234)["choices"][0]["text"]
    b = qwen(prompt, max_tokens=12, temperature=1.0, seed=1234)["choices"][0]["text"]
    assert a == b


def test_echo_and_logprobs(qwen):
    out = qwen("def add(a, b):", max_tokens=4, temperature=0, echo=True, logprobs=3)
    text = out["choices"][0]["text"]
    assert text.startswith("def add(a, b):")
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) >= 1 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(len(top) == 3 for top in lp["top_logprobs"])


def test_context_shift_continues_past_n_ctx(tiny):
    # max_tokens=-1 on a 64-token context: generation goes on past n_ctx by dropping half of the history
    prompt = synthetic_json()["token_sequence"][:8]
    tiny.reset()
    produced = []
    for token in tiny.generate_tokens(prompt, max_tokens=150, stop_tokens=[]):
        produced.append(token)
    assert len(produced) == 150
    assert tiny.n_tokens <= tiny.n_ctx()
    assert tiny.input_ids[0] == 1   # the BOS token is kept


def test_chat_completion_streams_deltas(qwen):
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    full = qwen.create_chat_completion(messages, max_tokens=8, temperature=0)
    assert "Paris" in full["choices"][0]["message"]["content"]
    assert full["choices"][0]["finish_reason"] == "stop"
    deltas = list(qwen.create_chat_completion(messages, max_tokens=8, temperature=0, stream=True))
    assert deltas[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(d["choices"][0]["delta"].get("content", "") for d in deltas)
    assert text == full["choices"][0]["message"]["content"]


def test_one_model_shared_by_threads_gives_each_the_same_text(qwen):
    prompt = "<|im_start|>user\nCount from 1 to 5.<|im_end|>\n<|im_start|>assistant\n"
    expected = qwen(prompt, max_tokens=10, temperature=0)["choices"][0]["text"]
    results, errors = [], []

    def worker():
        try:
            results.append(qwen(prompt, max_tokens=10, temperature=0)["choices"][0]["text"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 4


def test_prompt_cache_reuse_gives_the_numbers_of_a_fresh_evaluation(qwen):
    case = real_json("qwen")["greedy"][1]
    prompt = case["prompt_tokens"]
    qwen.reset()
    qwen.eval(prompt)
    fresh = np.asarray(qwen.eval_logits[-1], np.float32)
    # a completion leaves the prompt plus generated tokens in the cache; the same prompt again reuses the
    # batch-evaluated prefix and must reproduce the fresh logits bit for bit
    qwen.create_completion(prompt, max_tokens=3, temperature=0)
    qwen._prepare_prompt(prompt)
    np.testing.assert_array_equal(np.asarray(qwen.eval_logits[-1], np.float32), fresh)
    # a longer prompt sharing the prefix: the same numbers as evaluating it from scratch
    longer = prompt + case["greedy_tokens"][:20]
    qwen._prepare_prompt(longer)
    reused = np.asarray(qwen.eval_logits[-1], np.float32)
    qwen.reset()
    qwen.eval(longer)
    np.testing.assert_array_equal(reused, np.asarray(qwen.eval_logits[-1], np.float32))


def test_short_prompts_reuse_what_the_integer_kernels_computed(qwen):
    """Below BLAS_MIN_TOKENS every token gets the same numbers in any batch, so a short prompt reuses a cached
    prefix computed that way (a chat's system prompt) and still gets the logits of a fresh evaluation."""
    from ggml_backend.quant.matmul import BLAS_MIN_TOKENS
    system = qwen.tokenize("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n", special=True)
    first = system + qwen.tokenize("Hi there", add_bos=False)
    second = system + qwen.tokenize("What is 2+2?", add_bos=False)
    assert len(second) < BLAS_MIN_TOKENS
    qwen.reset()
    qwen.create_completion(first, max_tokens=3, temperature=0)
    assert qwen.reusable_prefix(second) == len(system)
    qwen._prepare_prompt(second)
    reused = np.asarray(qwen.eval_logits[-1], np.float32)
    qwen.reset()
    qwen.eval(second)
    np.testing.assert_array_equal(reused, np.asarray(qwen.eval_logits[-1], np.float32))
    # a long prompt does not take positions the integer kernels computed: a fresh run batches them
    long_prompt = second + qwen.tokenize(" and" * BLAS_MIN_TOKENS, add_bos=False)
    assert qwen.reusable_prefix(long_prompt) == 0


# --- streams and threads: the model's scheduler (issue 19) ----------------------------------------------------------
# Every wait is bounded: a regression to a lock held across yield must fail these tests, not hang the suite.

def _seeded():
    from ggml_backend.generation import SamplingParams
    return SamplingParams(temperature=0.8, seed=42)


def _in_thread(fn, timeout=60):
    """fn() in another thread; its result, or an AssertionError if it did not finish in time (a deadlock)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test's thread
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: a deadlock"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_stream_may_be_advanced_from_one_thread_then_another(tiny):
    prompt = synthetic_json()["token_sequence"][:8]
    alone = list(tiny.generate_tokens(prompt, params=_seeded(), max_tokens=12, stop_tokens=[]))
    stream = tiny.generate_tokens(prompt, params=_seeded(), max_tokens=12, stop_tokens=[])
    tokens = [next(stream) for _ in range(4)]
    # with the lock held across yield, the next step on another thread waited forever for this thread's lock
    tokens += _in_thread(lambda: [next(stream) for _ in range(4)])
    tokens += list(stream)
    assert tokens == alone


def test_two_threads_advancing_one_stream_at_once_get_a_clear_error(tiny):
    prompt = synthetic_json()["token_sequence"][:8]
    for make in (lambda: tiny.generate_tokens(prompt, max_tokens=8, stop_tokens=[]),
                 lambda: tiny.create_completion(prompt, max_tokens=8, stream=True, stop_tokens=[])):
        stream = make()
        hold, holding = threading.Event(), threading.Event()

        def keep_the_worker():
            holding.set()
            hold.wait(30)
        # keep the model's worker busy so that the first thread is surely inside next() when the second arrives
        # (and busy before the first asks: a stream that asks first is stepped first, and its step is over at once)
        blocker = threading.Thread(target=tiny.session.call, args=(keep_the_worker,), daemon=True)
        blocker.start()
        assert holding.wait(30)
        first = threading.Thread(target=lambda: next(stream), daemon=True)
        first.start()
        # until the first thread waits inside next() (the stream's own busy flag, a private detail read only here)
        busy = stream._busy if hasattr(stream, "_busy") else stream._request.consumer_busy
        deadline = time.monotonic() + 30
        while not busy.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert busy.locked()
        with pytest.raises(RuntimeError, match="already being iterated in another thread"):
            _in_thread(lambda: next(stream), timeout=10)
        hold.set()
        first.join(30)
        blocker.join(30)
        assert not first.is_alive() and not blocker.is_alive()
        stream.close()


def test_a_stream_closed_from_another_thread_frees_the_model(tiny):
    prompt = synthetic_json()["token_sequence"][:8]
    expected = list(tiny.generate_tokens(prompt, params=_seeded(), max_tokens=6, stop_tokens=[]))
    stream = tiny.create_completion(prompt, max_tokens=200, stream=True, stop_tokens=[])
    next(stream)
    _in_thread(stream.close, timeout=10)   # old code: "cannot release un-acquired lock", the lock left held
    assert list(stream) == []
    assert _in_thread(lambda: list(tiny.generate_tokens(prompt, params=_seeded(), max_tokens=6, stop_tokens=[])),
                      timeout=30) == expected
    # a stream dropped without close (garbage) ends its generation too
    dropped = tiny.generate_tokens(prompt, max_tokens=200, stop_tokens=[])
    next(dropped)
    del dropped
    assert _in_thread(lambda: list(tiny.generate_tokens(prompt, params=_seeded(), max_tokens=6, stop_tokens=[])),
                      timeout=30) == expected


def test_an_idle_stream_does_not_block_others_and_keeps_its_results(tiny):
    prompt = synthetic_json()["token_sequence"][:8]
    other = synthetic_json()["token_sequence"][8:14]
    alone = list(tiny.generate_tokens(prompt, params=_seeded(), max_tokens=10, stop_tokens=[]))
    other_alone = tiny.create_completion(other, max_tokens=6, temperature=0, stop_tokens=[])["choices"][0]["text"]
    idle = tiny.generate_tokens(prompt, params=_seeded(), max_tokens=10, stop_tokens=[])
    tokens = [next(idle) for _ in range(3)]
    # another thread (and this one) get the model while the first stream waits; its state is saved and restored
    assert _in_thread(lambda: tiny.create_completion(other, max_tokens=6, temperature=0, stop_tokens=[]),
                      timeout=30)["choices"][0]["text"] == other_alone
    tiny.reset()
    tokens += list(idle)
    assert tokens == alone


def test_a_sampling_params_gives_what_the_keywords_give(qwen):
    from ggml_backend.generation import SamplingParams
    prompt = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    # create_completion's keyword defaults as one SamplingParams (repeat_last_n: the constructor's 64)
    llama_cpp_defaults = dict(repeat_penalty=1.0, repeat_last_n=qwen.last_n_tokens_size)
    texts = []
    for keywords in ({"temperature": 0}, {"temperature": 0.9, "seed": 1234}):
        by_keywords = qwen.create_completion(prompt, max_tokens=6, **keywords)
        by_params = qwen.create_completion(prompt, max_tokens=6,
                                           sampling=SamplingParams(**llama_cpp_defaults, **keywords))
        assert by_params["choices"][0]["text"] == by_keywords["choices"][0]["text"]
        texts.append(by_keywords["choices"][0]["text"])
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = qwen.create_chat_completion(messages, max_tokens=6, temperature=0)
    chat_params = qwen.create_chat_completion(messages, max_tokens=6,
                                              sampling=SamplingParams(temperature=0, repeat_penalty=1.0))
    assert chat_params["choices"][0]["message"] == chat["choices"][0]["message"]
    # a keyword away from its default overrides the SamplingParams' field: greedy again
    overridden = qwen.create_completion(prompt, max_tokens=6, temperature=0,
                                        sampling=SamplingParams(temperature=1.5, seed=7, **llama_cpp_defaults))
    assert overridden["choices"][0]["text"] == texts[0]


def test_sampling_keyword_rules(tiny):
    from ggml_backend.api import _with_overrides
    from ggml_backend.generation import SamplingParams
    base = SamplingParams(temperature=0.3, top_k=5, seed=9)
    # keywords at the method's defaults leave the SamplingParams alone; others replace its fields
    assert _with_overrides(base, Llama.create_completion, {"temperature": 0.8, "top_k": 40, "seed": None}) is base
    changed = _with_overrides(base, Llama.create_completion, {"temperature": 0.0, "top_k": 40, "seed": 3})
    assert (changed.temperature, changed.top_k, changed.seed) == (0.0, 5, 3)
    with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
        tiny.create_completion([1, 2, 3], max_tokens=1, sampling={"temperature": 0})
    with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
        tiny.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1, sampling=0.5)
