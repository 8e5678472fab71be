"""``GGMLLLM``: a LangChain text-completion model (``langchain_core.language_models.LLM``) on ggml_backend."""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LLM
from langchain_core.outputs import GenerationChunk
from pydantic import ConfigDict, PrivateAttr

from ggml_backend.generation.grammar import LlamaGrammar

from ._shared import SharedModel, aiter_in_thread, get_shared_model, model_name_of


class GGMLLLM(LLM):
    """Text completion with a GGUF/GGML model file run by ggml_backend (pure Python, CPU).

    Example:
        .. code-block:: python

            from langchain_ggml import GGMLLLM

            llm = GGMLLLM(max_tokens=64, temperature=0)      # model_path=None: the default Qwen2.5-Coder-0.5B
            llm.invoke("def fibonacci(n):")

    Instances with the same ``model_path``, ``n_ctx``, ``n_threads`` and ``n_batch`` share one loaded model (loaded
    on first use, not at construction); calls from many threads are served one at a time.
    """

    model_path: str | None = None
    """Path of the .gguf / ggml .bin file; None means the default model (Qwen2.5-Coder-0.5B-Instruct)."""
    n_ctx: int = 2048
    """Context size in tokens (prompt + completion)."""
    n_threads: int | None = None
    """CPU threads for evaluation; None: all cores."""
    n_batch: int = 512
    """Prompt tokens evaluated per forward pass."""
    n_gpu_layers: int = 0
    """Accepted for llama.cpp compatibility; this engine runs on the CPU."""
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int | None = 256
    """Most tokens to generate; None or <= 0: until the model stops (the context shifts when full)."""
    seed: int | None = None
    """Sampling seed; None or -1: random each call."""
    stop: list[str] | None = None
    """Stop strings: the output ends before the first one."""
    grammar: str | None = None
    """A GBNF grammar (llama.cpp's syntax) every completion must follow, as ``LlamaCpp``'s ``grammar``."""
    grammar_path: str | None = None
    """A file holding such a grammar (``LlamaCpp``'s ``grammar_path``); give this or ``grammar``, not both."""
    verbose: bool = False

    model_config = ConfigDict(protected_namespaces=())
    _compiled_grammar: LlamaGrammar | None = PrivateAttr(default=None)

    # --- LangChain plumbing ----------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "ggml"

    @property
    def _default_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repeat_penalty": self.repeat_penalty, "max_tokens": self.max_tokens, "seed": self.seed}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_path": self.model_path, "n_ctx": self.n_ctx, **self._default_params}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "ggml"
        params["ls_model_name"] = kwargs.get("model") or model_name_of(self.model_path or "default")
        return params

    # --- generation ------------------------------------------------------------------------------------------
    @property
    def shared_model(self) -> SharedModel:
        """The loaded model these settings name (loaded now if this is its first use in the process)."""
        return get_shared_model(self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads, n_batch=self.n_batch,
                                verbose=self.verbose)

    def model_post_init(self, __context: Any) -> None:
        # the grammar is compiled here, so a bad one fails at construction, not at the first call
        if self.grammar is not None and self.grammar_path is not None:
            raise ValueError("give grammar or grammar_path, not both")
        self._compiled_grammar = (LlamaGrammar.from_string(self.grammar) if self.grammar is not None else
                                  LlamaGrammar.from_file(self.grammar_path) if self.grammar_path is not None else None)

    def _completion_kwargs(self, stop: list[str] | None, kwargs: dict) -> dict:
        params = {**self._default_params, **{k: v for k, v in kwargs.items() if k in self._default_params}}
        stops = list(self.stop or []) + list(stop or [])
        seed = params.pop("seed")
        return {**params, "stop": stops, "seed": None if seed == -1 else seed, "grammar": self._compiled_grammar}

    def _chunks(self, prompt: str, stop: list[str] | None, kwargs: dict) -> Iterator[GenerationChunk]:
        """The completion as GenerationChunks; the last one carries finish_reason and token usage."""
        shared = self.shared_model
        llama = shared.llama
        prompt_tokens = llama.tokenize(prompt, add_bos=llama.tokenizer.add_bos, special=True)
        # closed on every exit, also when this generator is closed or dropped mid-stream: the model is freed at once
        with shared.stream_completion(prompt_tokens, **self._completion_kwargs(stop, kwargs)) as chunks:
            for chunk in chunks:
                choice = chunk["choices"][0]
                info = None
                if choice["finish_reason"] is not None:
                    info = {"finish_reason": choice["finish_reason"], "usage": chunk.get("usage"),
                            "model_name": shared.model_name}
                if choice["text"] or info:
                    yield GenerationChunk(text=choice["text"], generation_info=info)

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

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return "".join(chunk.text for chunk in self._chunks(prompt, stop, kwargs))

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        parts = [chunk.text async for chunk in aiter_in_thread(lambda: self._chunks(prompt, stop, kwargs))]
        return "".join(parts)

    def get_num_tokens(self, text: str) -> int:
        return len(self.shared_model.llama.tokenize(text, add_bos=False, special=False))
