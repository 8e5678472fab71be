"""``GGMLLLM``: a LangChain text-completion model (``langchain_core.language_models.LLM``) on ggml_backend."""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LLM
from langchain_core.outputs import GenerationChunk, LLMResult
from pydantic import ConfigDict

from ._params import LlamaCppParams
from ._shared import aiter_in_thread, model_name_of


class GGMLLLM(LlamaCppParams, LLM):
    """Text completion with a GGUF/GGML model file run by ggml_backend (pure Python, CPU).

    Example:
        .. code-block:: python

            from langchain_ggml import GGMLLLM

            llm = GGMLLLM(max_tokens=64, temperature=0)      # model_path=None: the default Qwen2.5-Coder-0.5B
            llm.invoke("def fibonacci(n):")

    A drop-in for LangChain's ``LlamaCpp``: its constructor parameters with the same names, defaults and meaning
    (see ``LlamaCppParams`` and the README's table; those that tune llama.cpp's GPU or memory use are accepted and
    inert, those this engine cannot honour are refused at construction). The model is loaded at construction and
    exposed as ``client`` (a ``ggml_backend.Llama``); instances with the same model settings share it, and calls
    from many threads are served one at a time. ``streaming=True`` (the default) makes ``invoke`` generate
    through the stream, so callbacks' ``on_llm_new_token`` see every token.
    """

    stop: list[str] | None = []
    """Stop strings: the output ends before the first one (a call's ``stop`` adds to these)."""

    model_config = ConfigDict(protected_namespaces=())

    # --- LangChain plumbing ----------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "ggml"

    @property
    def _default_params(self) -> dict[str, Any]:
        return {"suffix": self.suffix, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p, "logprobs": self.logprobs,
                "echo": self.echo, "repeat_penalty": self.repeat_penalty, "seed": self.seed}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "n_ctx": self.n_ctx, **self._default_params}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ggml"
        params["ls_model_name"] = kwargs.get("model") or model_name_of(self.model_path or "default")
        return params

    # --- generation ------------------------------------------------------------------------------------------
    def _completion_kwargs(self, stop: list[str] | None, kwargs: dict) -> dict:
        """``create_completion`` arguments: the instance's, then the call's (any of ``create_completion``'s: an
        unknown one is its TypeError, as llama-cpp-python's)."""
        params = {**self._default_params, "repeat_last_n": self.last_n_tokens_size,
                  "grammar": self._compiled_grammar, **kwargs}
        params["seed"] = self._call_seed(kwargs.get("seed"))
        params["stop"] = list(self.stop or []) + list(stop or [])
        return params

    def _chunks(self, prompt: str, stop: list[str] | None, kwargs: dict) -> Iterator[GenerationChunk]:
        """The completion as GenerationChunks (with ``logprobs`` in generation_info when asked); the last one
        carries finish_reason and token usage."""
        shared = self.shared_model
        llama = shared.llama
        completion_kwargs = self._completion_kwargs(stop, kwargs)
        want_logprobs = completion_kwargs.get("logprobs") is not None
        prompt_tokens = llama.tokenize(prompt, add_bos=llama.tokenizer.add_bos, special=True)
        # closed on every exit, also when this generator is closed or dropped mid-stream: the model is freed at once
        with shared.stream_completion(prompt_tokens, **completion_kwargs) as chunks:
            for chunk in chunks:
                choice = chunk["choices"][0]
                info = {"logprobs": choice.get("logprobs")} if want_logprobs else {}
                if choice["finish_reason"] is not None:
                    info.update(finish_reason=choice["finish_reason"], usage=chunk.get("usage"),
                                model_name=shared.model_name)
                if choice["text"] or info:
                    yield GenerationChunk(text=choice["text"], generation_info=info or None)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for chunk in self._chunks(prompt, stop, kwargs):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for chunk in aiter_in_thread(lambda: self._chunks(prompt, stop, kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        """Each prompt's completion, through ``_stream`` (callbacks see every token) when ``streaming``; the
        generation keeps finish_reason, usage and logprobs."""
        generations = []
        for prompt in prompts:
            chunks = (self._stream(prompt, stop, run_manager, **kwargs) if self.streaming
                      else self._chunks(prompt, stop, kwargs))
            generations.append([_merge(chunks)])
        return LLMResult(generations=generations)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations = []
        for prompt in prompts:
            if self.streaming:
                chunks = [chunk async for chunk in self._astream(prompt, stop, run_manager, **kwargs)]
            else:
                chunks = [chunk async for chunk in aiter_in_thread(lambda: self._chunks(prompt, stop, kwargs))]
            generations.append([_merge(chunks)])
        return LLMResult(generations=generations)

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text

    def get_num_tokens(self, text: str) -> int:
        return len(self.shared_model.llama.tokenize(text, add_bos=False, special=False))


def _merge(chunks) -> GenerationChunk:
    merged = GenerationChunk(text="")
    for chunk in chunks:
        merged += chunk
    return merged
