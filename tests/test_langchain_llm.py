"""GGMLLLM (LangChain LLM) on the real default model: sync/async/streaming paths, callbacks, stop strings,
concurrency and the shared model cache. Generations are kept short: decoding is slow on a shared CPU."""
from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("langchain_core", reason="langchain-core is a dev dependency (pip install -e '.[dev]')")

try:
    import langchain_ggml  # noqa: F401
except ImportError:   # not installed as a package yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "langchain"))

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402

from langchain_ggml import GGMLLLM  # noqa: E402
from langchain_ggml import _shared  # noqa: E402

N_CTX = 1024          # the same as the other LangChain test modules: one model load for all of them
MAX_TOKENS = 8
PROMPT_A = "def reverse_string(s):"
PROMPT_B = "# Python: read a file\nwith open("


@pytest.fixture(scope="module")
def llm() -> GGMLLLM:
    return GGMLLLM(n_ctx=N_CTX, max_tokens=MAX_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def solo(llm) -> dict[str, str]:
    """Each prompt's completion, generated alone: what every other path must reproduce at temperature 0."""
    return {prompt: llm.invoke(prompt) for prompt in (PROMPT_A, PROMPT_B)}


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_invoke_is_the_engine_completion(llm, solo):
    engine = llm.client.create_completion(PROMPT_A, max_tokens=MAX_TOKENS, temperature=0, repeat_penalty=1.1)
    assert solo[PROMPT_A] == engine["choices"][0]["text"]
    assert "return" in solo[PROMPT_A]   # the model does answer: reversing a string is one return statement


def test_stream_fires_callback_before_each_chunk(llm, solo):
    recorder = TokenRecorder()
    chunks = []
    for chunk in llm.stream(PROMPT_A, config={"callbacks": [recorder]}):
        # the handler has already seen this chunk's text when the chunk reaches us
        assert recorder.tokens and recorder.tokens[-1] == chunk
        chunks.append(chunk)
    assert len(chunks) > 1
    assert "".join(chunks) == solo[PROMPT_A]
    assert "".join(recorder.tokens) == solo[PROMPT_A]


def test_stop_strings_cut_the_output(llm, solo):
    full = solo[PROMPT_A]
    assert "[::-1]" in full
    cut = llm.invoke(PROMPT_A, stop=["[::-1]"])
    assert cut == full[:full.index("[::-1]")]
    assert GGMLLLM(n_ctx=N_CTX, max_tokens=MAX_TOKENS, temperature=0, stop=["[::-1]"]).invoke(PROMPT_A) == cut


def test_batch(llm, solo):
    assert llm.batch([PROMPT_A, PROMPT_B]) == [solo[PROMPT_A], solo[PROMPT_B]]


def test_four_threads_get_their_solo_outputs(llm, solo):
    def run(job):
        mode, prompt = job
        if mode == "stream":
            return "".join(llm.stream(prompt))
        return llm.invoke(prompt)

    jobs = [("invoke", PROMPT_A), ("stream", PROMPT_B), ("stream", PROMPT_A), ("invoke", PROMPT_B)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    assert results == [solo[prompt] for _, prompt in jobs]


def test_async_paths_do_not_block_the_event_loop(llm, solo):
    async def scenario():
        ticks = 0
        running = True

        async def ticker():
            nonlocal ticks
            while running:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        recorder = TokenRecorder()
        chunks, ticks_between_chunks = [], []
        async for chunk in llm.astream(PROMPT_B, config={"callbacks": [recorder]}):
            chunks.append(chunk)
            ticks_between_chunks.append(ticks)
        invoked = await llm.ainvoke(PROMPT_A)
        running = False
        await tick_task
        return chunks, ticks_between_chunks, recorder.tokens, invoked, ticks

    chunks, ticks_seen, tokens, invoked, ticks = asyncio.run(scenario())
    assert "".join(chunks) == solo[PROMPT_B]
    assert tokens == chunks
    assert invoked == solo[PROMPT_A]
    # A token takes far longer than 10 ms, so a free loop ticks between chunks; a blocked one would not.
    assert ticks_seen[-1] > ticks_seen[0]
    assert ticks >= 10


def test_abandoned_async_stream_releases_the_model(llm, solo):
    async def first_chunk_only():
        async for chunk in llm.astream(PROMPT_A):
            return chunk

    first = asyncio.run(first_chunk_only())
    assert solo[PROMPT_A].startswith(first)
    # the worker stops after the item in progress and releases the lock: another thread gets the model
    result = []
    worker = threading.Thread(target=lambda: result.append(llm.invoke(PROMPT_B)))
    worker.start()
    worker.join(timeout=300)
    assert result == [solo[PROMPT_B]]


def test_a_second_generation_on_the_same_thread_runs_beside_an_open_stream(llm, solo):
    # once refused (the RLock would have let two generations share the KV cache); the model's scheduler saves the
    # idle stream's state and restores it, so both get the text they get alone
    stream = llm.stream(PROMPT_A)
    first = next(stream)
    assert llm.invoke(PROMPT_B) == solo[PROMPT_B]
    rest = "".join(stream)
    assert first + rest == solo[PROMPT_A]


def test_an_abandoned_stream_does_not_block_other_threads(llm, solo):
    abandoned = llm.stream(PROMPT_A)   # referenced, never finished nor closed
    next(abandoned)
    result = []
    worker = threading.Thread(target=lambda: result.append(llm.invoke(PROMPT_B)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "another thread waited for the abandoned stream: a deadlock"
    assert result == [solo[PROMPT_B]]
    # closed from another thread (as Gradio and garbage collection do): no error, and the model is free at once
    closer = threading.Thread(target=abandoned.close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive()
    worker = threading.Thread(target=lambda: result.append(llm.invoke(PROMPT_A)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and result[-1] == solo[PROMPT_A]


def test_instances_share_one_model(llm):
    # settings that change nothing here (inert ones, sampling ones) do not load the model again
    other = GGMLLLM(n_ctx=N_CTX, max_tokens=3, temperature=0.5, n_gpu_layers=35, use_mlock=True, f16_kv=False,
                    seed=7, last_n_tokens_size=32, verbose=False)
    assert other.shared_model is llm.shared_model and other.client is llm.client
    n_loaded = len(_shared._models)
    GGMLLLM(n_ctx=N_CTX, model_kwargs={"n_ubatch": 64, "logits_all": False})
    assert len(_shared._models) == n_loaded


def test_identity_and_validation():
    llm = GGMLLLM(n_ctx=N_CTX, temperature=0.3, max_tokens=5)
    assert llm._llm_type == "ggml"
    params = llm._identifying_params
    assert params["temperature"] == 0.3 and params["max_tokens"] == 5 and params["n_ctx"] == N_CTX
    assert llm._default_params["repeat_penalty"] == 1.1   # LlamaCpp's defaults


def test_grammar_and_grammar_path_constrain_every_completion(tmp_path):
    """LlamaCpp's grammar / grammar_path: every completion follows the GBNF grammar; a bad one fails at
    construction."""
    for seed in (1, 2):
        llm = GGMLLLM(n_ctx=512, max_tokens=8, temperature=1.0, seed=seed, grammar='root ::= " yes" | " no"')
        assert llm.invoke("Is the sky blue? Answer:") in (" yes", " no")
    grammar_file = tmp_path / "three_digits.gbnf"
    grammar_file.write_text('root ::= " " [0-9]{3}\n')
    llm = GGMLLLM(n_ctx=512, max_tokens=8, temperature=1.0, seed=3, grammar_path=str(grammar_file))
    out = llm.invoke("A number:")
    assert len(out) == 4 and out[1:].isdigit()
    with pytest.raises(ValueError, match="undefined_rule"):
        GGMLLLM(grammar="root ::= undefined_rule")
    with pytest.raises(ValueError, match="not both"):
        GGMLLLM(grammar='root ::= "a"', grammar_path=str(grammar_file))


# --- LlamaCpp's constructor parameters ------------------------------------------------------------------------
def test_streaming_invoke_sends_every_token_to_callbacks(solo):
    """LlamaCpp streams to callbacks on invoke whenever streaming=True (its default); streaming=False does not."""
    recorder = TokenRecorder()
    llm = GGMLLLM(n_ctx=N_CTX, max_tokens=MAX_TOKENS, temperature=0, callbacks=[recorder])
    assert llm.streaming is True
    assert llm.invoke(PROMPT_A) == solo[PROMPT_A]
    assert len([t for t in recorder.tokens if t]) > 1 and "".join(recorder.tokens) == solo[PROMPT_A]
    result = llm.generate([PROMPT_B])
    info = result.generations[0][0].generation_info
    assert result.generations[0][0].text == solo[PROMPT_B] and info["finish_reason"] == "length"
    assert info["usage"]["completion_tokens"] == MAX_TOKENS

    quiet = TokenRecorder()
    llm = GGMLLLM(n_ctx=N_CTX, max_tokens=MAX_TOKENS, temperature=0, streaming=False, callbacks=[quiet])
    assert llm.invoke(PROMPT_A) == solo[PROMPT_A]
    assert quiet.tokens == []

    async_recorder = TokenRecorder()
    llm = GGMLLLM(n_ctx=N_CTX, max_tokens=MAX_TOKENS, temperature=0, callbacks=[async_recorder])
    assert asyncio.run(llm.ainvoke(PROMPT_B)) == solo[PROMPT_B]
    assert "".join(async_recorder.tokens) == solo[PROMPT_B]


def test_bad_model_path_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match="Could not load the model from path.*not found"):
        GGMLLLM(model_path="/nonexistent/model.gguf")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ValueError, match="Could not load the model from path"):
        GGMLLLM(model_path=str(corrupt))
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    with pytest.raises(ValueError, match="Could not load the model from path"):
        GGMLLLM(model_path=str(not_a_model))


def test_client_is_the_loaded_llama(llm):
    from ggml_backend import Llama
    assert isinstance(llm.client, Llama) and llm.client is llm.shared_model.llama
    assert llm.client.n_ctx() == N_CTX
    # a Llama handed in is used as is
    other = GGMLLLM(client=llm.client, max_tokens=MAX_TOKENS, temperature=0)
    assert other.client is llm.client and other.model_path == llm.client.model_path
    with pytest.raises(ValueError, match="client must be a ggml_backend.Llama"):
        GGMLLLM(client="not a model")


def test_model_kwargs_reach_llama_and_unknown_ones_raise():
    llm = GGMLLLM(n_ctx=N_CTX, model_kwargs={"chat_format": "chatml"}, verbose=False)
    assert llm.client.chat_format == "chatml"
    with pytest.warns(UserWarning, match="transferred to model_kwargs"):   # as LlamaCpp: unknown fields go there
        moved = GGMLLLM(n_ctx=N_CTX, chat_format="llama-2", verbose=False)
    assert moved.model_kwargs == {"chat_format": "llama-2"} and moved.client.chat_format == "llama-2"
    with pytest.warns(UserWarning, match="should be specified explicitly"):   # a field named in model_kwargs
        assert GGMLLLM(n_ctx=N_CTX, model_kwargs={"top_k": 7}, verbose=False).top_k == 7
    with pytest.raises(TypeError, match="unknown Llama parameter.*'bogus'"):
        GGMLLLM(n_ctx=N_CTX, model_kwargs={"bogus": 1})
    with pytest.raises(TypeError, match="unknown Llama parameter.*'max_token'"), pytest.warns(UserWarning):
        GGMLLLM(n_ctx=N_CTX, max_token=4)   # a typo is an error, not a silently ignored argument
    with pytest.raises(TypeError, match="max_token"):
        GGMLLLM(n_ctx=N_CTX, verbose=False).invoke(PROMPT_A, max_token=4)   # a call's unknown argument too


def test_inert_parameters_are_accepted(llm):
    inert = GGMLLLM(n_ctx=N_CTX, max_tokens=MAX_TOKENS, temperature=0, f16_kv=False, n_gpu_layers=-1,
                    use_mlock=True, use_mmap=False, n_parts=1, verbose=False)
    assert inert.client is llm.client
    defaults = GGMLLLM(n_ctx=N_CTX, verbose=False)
    assert (defaults.f16_kv, defaults.n_parts, defaults.n_gpu_layers, defaults.use_mmap) == (True, -1, None, True)
    # LlamaCpp's rope defaults (10000, 1) mean the model's own values; others are passed on
    assert defaults.llama_params()["rope_freq_base"] == 0.0 and defaults.llama_params()["rope_freq_scale"] == 0.0
    assert GGMLLLM(client=llm.client, rope_freq_base=20000.0).llama_params()["rope_freq_base"] == 20000.0


@pytest.mark.parametrize("setting, message", [
    ({"vocab_only": True}, "vocab_only"), ({"lora_path": "adapter.bin"}, "LoRA"),
    ({"lora_base": "base.gguf"}, "LoRA"), ({"n_parts": 2}, "one part")])
def test_what_cannot_be_honoured_is_refused_at_construction(setting, message):
    with pytest.raises(ValueError, match=message):
        GGMLLLM(n_ctx=N_CTX, verbose=False, **setting)


def test_seed_is_set_once_and_calls_draw_on(llm):
    """As LlamaCpp's seed (llama_cpp.Llama(seed=...)): calls differ, a run of calls reproduces."""
    def run():
        sampled = GGMLLLM(client=llm.client, max_tokens=4, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                          seed=1234)
        return [sampled.invoke(PROMPT_B) for _ in range(3)]
    first = run()
    assert run() == first
    assert len(set(first)) > 1


def test_echo_logprobs_and_suffix(llm, solo):
    echoed = GGMLLLM(client=llm.client, max_tokens=MAX_TOKENS, temperature=0, echo=True).invoke(PROMPT_A)
    assert echoed == PROMPT_A + solo[PROMPT_A]
    result = GGMLLLM(client=llm.client, max_tokens=4, temperature=0, logprobs=2).generate([PROMPT_A])
    logprobs = result.generations[0][0].generation_info["logprobs"]
    assert len(logprobs["tokens"]) == 4 and all(len(top) == 2 for top in logprobs["top_logprobs"])
    # suffix: a fill-in-the-middle prompt (Qwen2.5-Coder has the FIM tokens)
    middle = GGMLLLM(client=llm.client, max_tokens=8, temperature=0, suffix="\n    return total\n").invoke(
        "def add(a, b):\n")
    assert isinstance(middle, str) and middle
