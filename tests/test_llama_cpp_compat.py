"""llama-cpp-python's behaviours, on the real default model: exact parameters (TypeError for an unknown one,
NotImplementedError for what this engine cannot honour), logits processors and stopping criteria, max_tokens up to
the end of the context, the seed drawn on, and the methods and attributes llama-cpp-python's users reach for."""
from __future__ import annotations

import inspect
import json
import time

import numpy as np
import pytest

import ggml_backend
from ggml_backend import (Llama, LlamaDiskCache, LlamaRAMCache, LlamaTokenizer, LogitsProcessorList,
                          StoppingCriteriaList)

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm():
    return Llama(n_ctx=96, verbose=False)


def _text(result) -> str:
    return result["choices"][0]["text"]


# --- parameters ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda llm: llm(PROMPT, max_token=4),
    lambda llm: llm.create_completion(PROMPT, max_token=4),
    lambda llm: llm.create_chat_completion([{"role": "user", "content": "hi"}], max_token=4),
    lambda llm: llm.generate([1, 2], temperature=0.5),
    lambda llm: llm.sample(temperature=0.5),
    lambda llm: llm.tokenize(b"hi", bos=True),
    lambda llm: llm.detokenize([1], skip=True),
    lambda llm: llm.eval([1], batch=2),
    lambda llm: llm.reset(hard=True),
    lambda llm: llm.save_state(full=True),
])
def test_unknown_keywords_raise_type_error(llm, call):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        call(llm)


def test_max_token_typo_names_the_argument(llm):
    with pytest.raises(TypeError, match="'max_token'"):
        llm("hi", max_token=4)


def test_unknown_constructor_keyword_raises_before_loading():
    with pytest.raises(TypeError, match="'n_gpu_layer'"):
        Llama(n_gpu_layer=10, verbose=False)


def test_llama_cpp_python_parameters_are_all_there():
    """The names and defaults of llama-cpp-python 0.3.x's public methods (ours may add keyword-only ones)."""
    expected = {
        "create_completion": dict(suffix=None, max_tokens=16, temperature=0.8, top_p=0.95, min_p=0.05,
                                  typical_p=1.0, logprobs=None, echo=False, frequency_penalty=0.0,
                                  presence_penalty=0.0, repeat_penalty=1.0, top_k=40, stream=False, seed=None,
                                  tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, model=None,
                                  stopping_criteria=None, logits_processor=None, grammar=None, logit_bias=None),
        "create_chat_completion": dict(functions=None, function_call=None, tools=None, tool_choice=None,
                                       temperature=0.2, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0,
                                       stream=False, seed=None, response_format=None, max_tokens=None,
                                       presence_penalty=0.0, frequency_penalty=0.0, repeat_penalty=1.0, tfs_z=1.0,
                                       mirostat_mode=0, mirostat_tau=5.0, mirostat_eta=0.1, model=None,
                                       logits_processor=None, grammar=None, logit_bias=None, logprobs=None,
                                       top_logprobs=None),
        "generate": dict(top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0, temp=0.80, repeat_penalty=1.0,
                         reset=True, frequency_penalty=0.0, presence_penalty=0.0, tfs_z=1.0, mirostat_mode=0,
                         mirostat_tau=5.0, mirostat_eta=0.1, penalize_nl=True, logits_processor=None,
                         stopping_criteria=None, grammar=None),
        "sample": dict(top_k=40, top_p=0.95, min_p=0.05, typical_p=1.0, temp=0.80, repeat_penalty=1.0,
                       frequency_penalty=0.0, presence_penalty=0.0, tfs_z=1.0, mirostat_mode=0, mirostat_eta=0.1,
                       mirostat_tau=5.0, penalize_nl=True, logits_processor=None, grammar=None, idx=None),
        "tokenize": dict(add_bos=True, special=False),
        "detokenize": dict(prev_tokens=None, special=False),
        "__init__": dict(n_gpu_layers=0, split_mode=1, main_gpu=0, tensor_split=None, vocab_only=False,
                         use_mmap=True, use_mlock=False, kv_overrides=None, seed=0xFFFFFFFF, n_ctx=512,
                         n_batch=512, n_ubatch=512, n_threads=None, n_threads_batch=None, rope_scaling_type=-1,
                         pooling_type=-1, attention_type=-1, rope_freq_base=0.0, rope_freq_scale=0.0,
                         yarn_ext_factor=-1.0, yarn_attn_factor=1.0, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
                         yarn_orig_ctx=0, logits_all=False, embedding=False, offload_kqv=True, flash_attn=False,
                         op_offload=None, swa_full=None, no_perf=False, last_n_tokens_size=64, lora_base=None,
                         lora_scale=1.0, lora_path=None, numa=False, chat_format=None, chat_handler=None,
                         draft_model=None, tokenizer=None, type_k=None, type_v=None, spm_infill=False,
                         verbose=True),
    }
    for method, defaults in expected.items():
        params = inspect.signature(getattr(Llama, method)).parameters
        for name, default in defaults.items():
            assert name in params, f"{method} lacks {name}"
            assert params[name].default == default, f"{method}({name}=...) default"
        assert not any(p.kind == p.VAR_KEYWORD for p in params.values()), f"{method} takes **kwargs"
    # the positional order of create_completion and create_chat_completion is llama-cpp-python's
    order = list(inspect.signature(Llama.create_completion).parameters)[1:len(expected["create_completion"]) + 3]
    assert order[:4] == ["prompt", "suffix", "max_tokens", "temperature"]
    chat = list(inspect.signature(Llama.create_chat_completion).parameters)
    assert chat[1:6] == ["messages", "functions", "function_call", "tools", "tool_choice"]


@pytest.mark.parametrize("kwargs", [dict(lora_path="x.bin"), dict(numa=True), dict(split_mode=2),
                                    dict(kv_overrides={"a": 1}), dict(yarn_ext_factor=1.0),
                                    dict(type_k=2), dict(type_v=30),
                                    dict(chat_handler=print)])
def test_constructor_refuses_what_it_cannot_honour(kwargs):
    with pytest.raises(NotImplementedError, match=next(iter(kwargs))):
        Llama(verbose=False, **kwargs)


def test_inert_constructor_parameters_are_accepted():
    llm = Llama(n_ctx=32, verbose=False, n_gpu_layers=-1, main_gpu=0, tensor_split=[1.0], use_mmap=False,
                use_mlock=True, offload_kqv=False, flash_attn=True, n_ubatch=64, n_threads_batch=2, no_perf=True,
                type_k=8, type_v=0, op_offload=False, swa_full=True)
    assert (llm.cache.type_k, llm.cache.type_v) == ("q8_0", "f32")
    assert llm.n_ctx() == 32
    llm.close()


def test_grammar_and_response_format_constrain_the_reply(roomy):
    llm = roomy
    from ggml_backend import LlamaGrammar
    with pytest.raises(TypeError, match="LlamaGrammar"):
        llm(PROMPT, max_tokens=2, grammar=object())
    yes_no = LlamaGrammar.from_string('root ::= "yes" | "no"')
    for seed in (1, 2, 3):
        out = llm("Is the sky blue? Answer:", max_tokens=8, temperature=1.0, seed=seed, grammar=yes_no)
        assert out["choices"][0]["text"] in ("yes", "no") and out["choices"][0]["finish_reason"] == "stop"
    tokens = list(llm.generate(llm.tokenize(b"Answer:"), temp=1.0, grammar=yes_no))
    assert llm.detokenize(tokens).decode() in ("yes", "no")
    schema = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                               "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                                               "genre": {"enum": ["drama", "comedy", "horror"]}},
              "required": ["title", "year", "genre"], "additionalProperties": False}
    for fmt in ({"type": "json_object", "schema": schema},
                {"type": "json_schema", "json_schema": {"name": "movie", "schema": schema, "strict": True}}):
        out = llm.create_chat_completion([{"role": "user", "content": "Name a movie."}], max_tokens=60,
                                         temperature=0.8, seed=4, response_format=fmt)
        movie = json.loads(out["choices"][0]["message"]["content"])
        assert set(movie) == {"title", "year", "genre"} and movie["genre"] in ("drama", "comedy", "horror")
        assert 1900 <= movie["year"] <= 2030
    anything = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=40, temperature=0,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(anything["choices"][0]["message"]["content"]), dict)
    with pytest.raises(ValueError, match="not both"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, grammar=yes_no,
                                   response_format={"type": "json_object"})
    with pytest.raises(NotImplementedError, match="grammar"):
        llm.sample(grammar=yes_no)
    out = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0,
                                     response_format={"type": "text"})
    assert out["choices"][0]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def roomy():
    return Llama(n_ctx=512, verbose=False)


def test_forced_tool_calls_always_validate(roomy):
    llm = roomy
    tools = [{"type": "function", "function": {
        "name": "book_flight", "description": "Book a flight",
        "parameters": {"type": "object", "properties": {"to": {"type": "string", "maxLength": 30},
                                                        "seats": {"type": "integer", "minimum": 1, "maximum": 9}},
                       "required": ["to", "seats"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}]
    for choice in ("required", {"type": "function", "function": {"name": "book_flight"}}):
        for seed in (1, 2, 3):
            out = llm.create_chat_completion([{"role": "user", "content": "Tell me a story."}], tools=tools,
                                             tool_choice=choice, temperature=1.0, seed=seed, max_tokens=60)
            call = out["choices"][0]["message"]["tool_calls"][0]["function"]
            args = json.loads(call["arguments"])
            assert out["choices"][0]["finish_reason"] == "tool_calls"
            if call["name"] == "book_flight":
                assert set(args) == {"to", "seats"} and 1 <= args["seats"] <= 9
            else:
                assert call["name"] == "get_time" and args == {}


def test_suffix_fills_in_the_middle_on_a_fim_model(llm):
    # the default model (Qwen2.5-Coder) has <|fim_prefix|>, <|fim_suffix|> and <|fim_middle|>
    out = llm("def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))\n", max_tokens=4, temperature=0)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


# --- logits processors and stopping criteria ------------------------------------------------------------------------
def test_logits_processor_sees_ids_and_scores_and_decides(llm):
    forced = llm.tokenize(b" banana", add_bos=False)[0]
    seen = []

    def only_banana(input_ids, scores):
        seen.append((input_ids.copy(), scores.dtype, scores.shape))
        out = np.full_like(scores, -np.inf)
        out[forced] = 0.0
        return out

    result = llm(PROMPT, max_tokens=3, logits_processor=LogitsProcessorList([only_banana]))
    assert _text(result) == " banana" * 3
    ids, dtype, shape = seen[0]
    assert isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.integer)
    assert ids.tolist() == llm.tokenize(PROMPT.encode())
    assert (dtype, shape) == (np.float32, (llm.n_vocab(),))
    assert len(seen[1][0]) == len(ids) + 1


def test_stopping_criteria_end_with_finish_reason_stop(llm):
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    criteria = StoppingCriteriaList([lambda input_ids, logits: len(input_ids) >= n_prompt + 2])
    result = llm(PROMPT, max_tokens=10, temperature=0, stopping_criteria=criteria)
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == 2   # the token sampled when it said stop is not kept


# --- max_tokens and the context ---------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [None, 0, -1])
def test_max_tokens_none_or_not_positive_runs_to_the_end_of_the_context(llm, max_tokens):
    logit_bias = {t: -1e9 for t in llm.tokenizer.eog_ids}   # the model may not end its turn
    result = llm(PROMPT, max_tokens=max_tokens, temperature=0, logit_bias=logit_bias)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["total_tokens"] == llm.n_ctx()


def test_max_tokens_is_cut_to_the_context_and_long_prompts_raise(llm):
    long_prompt = list(range(1000, 1000 + llm.n_ctx() - 3))
    result = llm(long_prompt, max_tokens=50, temperature=0, logit_bias={t: -1e9 for t in llm.tokenizer.eog_ids})
    assert result["usage"]["completion_tokens"] == 3
    with pytest.raises(ValueError, match="exceed context window"):
        llm(list(range(1000, 1000 + llm.n_ctx())), max_tokens=1)


# --- seeds --------------------------------------------------------------------------------------------------
def test_constructor_seed_draws_on_and_call_seed_reproduces():
    one = Llama(n_ctx=64, seed=1337, verbose=False)
    first = [_text(one(PROMPT, max_tokens=8, temperature=1.0)) for _ in range(3)]
    assert len(set(first)) > 1   # repeated calls differ
    two = Llama(n_ctx=64, seed=1337, verbose=False)
    assert [_text(two(PROMPT, max_tokens=8, temperature=1.0)) for _ in range(3)] == first   # the run reproduces
    assert _text(one(PROMPT, max_tokens=8, temperature=1.0, seed=7)) == _text(
        one(PROMPT, max_tokens=8, temperature=1.0, seed=7))
    one.set_seed(42)
    a = _text(one(PROMPT, max_tokens=8, temperature=1.0))
    one.set_seed(42)
    assert _text(one(PROMPT, max_tokens=8, temperature=1.0)) == a


# --- methods and attributes -----------------------------------------------------------------------------------
def test_generate_and_sample_as_llama_cpp_python(llm):
    tokens = llm.tokenize(b"The capital of France is")
    stream = llm.generate(tokens, temp=0)
    first = [next(stream) for _ in range(3)]
    stream.close()
    greedy = llm(list(tokens), max_tokens=3, temperature=0)
    assert llm.detokenize(first).decode() == _text(greedy)
    llm.reset()
    llm.eval(tokens)
    assert llm.sample(temp=0) == first[0]
    # generate never ends on its own at an end token; a stopping criterion ends it
    ended = list(llm.generate(tokens, temp=0, stopping_criteria=StoppingCriteriaList(
        [lambda ids, logits: len(ids) >= len(tokens) + 4])))
    assert ended[:3] == first and len(ended) == 4


def test_generate_reset_false_continues(llm):
    tokens = llm.tokenize(b"The capital of France is")
    whole = llm.generate(tokens, temp=0)
    expected = [next(whole) for _ in range(2)]
    whole.close()
    head = llm.generate(tokens, temp=0)
    first = next(head)
    head.close()
    llm.eval([first])
    tail = llm.generate([], temp=0, reset=False)
    assert next(tail) == expected[1]
    tail.close()


def test_small_methods_and_attributes(llm):
    assert ggml_backend.__version__
    assert llm.n_embd() == 896
    json.dumps(llm.metadata)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in llm.metadata.items())
    assert llm.metadata["general.architecture"] == "qwen2"
    tokenizer = llm.tokenizer()
    assert isinstance(tokenizer, LlamaTokenizer)
    ids = tokenizer.encode("hello world")
    assert tokenizer.decode(ids) == "hello world"
    assert llm.tokenizer.eog_ids   # the engine's own tokenizer is still there
    llm.reset()
    llm.eval(llm.tokenize(b"hi there"))
    rows = llm.eval_logits
    assert rows.maxlen == 1 and len(rows) == 1 and len(rows[0]) == llm.n_vocab()
    assert list(llm.eval_tokens) == llm.tokenize(b"hi there")
    state = llm.save_state()
    assert state.n_tokens == len(llm.tokenize(b"hi there"))


def test_eval_logits_rows_with_logits_all():
    with Llama(n_ctx=32, logits_all=True, verbose=False) as full:
        full.eval(full.tokenize(b"one two three"))
        assert len(full.eval_logits) == full.n_tokens
        assert np.allclose(full.eval_logits[-1], full.scores[full.n_tokens - 1])
    assert full._closed


def test_caches(llm, tmp_path):
    for cache in (LlamaRAMCache(), LlamaDiskCache(cache_dir=str(tmp_path / "cache"))):
        llm.set_cache(cache)
        try:
            prompt = "A long shared system prompt that the cache keeps for the next question: " * 2
            first = _text(llm(prompt + "one", max_tokens=2, temperature=0))
            deadline = time.monotonic() + 10   # the state is stored on the model's thread as the generation ends
            while not len(cache) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(cache) == 1 and cache.cache_size > 0
            tokens = llm.tokenize((prompt + "one").encode())
            assert tokens in cache and cache[tokens].input_ids[0] == tokens[0]
            llm.reset()
            assert _text(llm(prompt + "one", max_tokens=2, temperature=0)) == first
        finally:
            llm.set_cache(None)


@pytest.mark.parametrize("name", ["llama-3", "mistral-instruct", "gemma", "qwen", "zephyr", "phi-3", "chatml"])
def test_chat_formats_by_name(name):
    with Llama(n_ctx=64, chat_format=name, verbose=False) as chat:
        result = chat.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
        assert result["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completion_in_the_openai_packages_types(roomy):
    """``create_chat_completion_openai_v1``: the same reply as ``create_chat_completion``, as ``openai``'s
    ``ChatCompletion`` (validated by its pydantic models), or streamed as ``ChatCompletionChunk``s."""
    types = pytest.importorskip("openai.types.chat", reason="the openai package (a dev dependency) is not installed")
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = roomy.create_chat_completion(messages, temperature=0, max_tokens=12)
    reply = roomy.create_chat_completion_openai_v1(messages, temperature=0, max_tokens=12)
    assert isinstance(reply, types.ChatCompletion)
    assert reply.choices[0].message.content == plain["choices"][0]["message"]["content"]
    assert reply.usage.completion_tokens == plain["usage"]["completion_tokens"]
    chunks = list(roomy.create_chat_completion_openai_v1(messages, temperature=0, max_tokens=12, stream=True))
    assert all(isinstance(c, types.ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain["choices"][0]["message"]["content"]
    assert chunks[-1].choices[0].finish_reason == plain["choices"][0]["finish_reason"]
    with pytest.raises(TypeError):
        roomy.create_chat_completion_openai_v1(messages, max_token=3)
