"""The constructor parameters ``GGMLLLM`` and ``ChatGGML`` share with LangChain's ``LlamaCpp`` / ``ChatLlamaCpp``
(langchain_community), with the same names, defaults and meaning where they have one here, and what is done with
them at construction: the model is loaded (or found already loaded, see ``_shared``) and exposed as ``client``,
so a missing or corrupt file, an unknown ``model_kwargs`` key or a setting this engine cannot honour fails at
construction, as there.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from langchain_core.utils import get_pydantic_field_names
from langchain_core.utils.utils import _build_model_kwargs
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from ggml_backend import Llama
from ggml_backend.generation.sampling import next_chain_seed, seed_is_random
from ggml_backend.generation.grammar import LlamaGrammar

from ._shared import SharedModel, get_shared_model, shared_model_of

#: ``rope_freq_base`` / ``rope_freq_scale`` defaults of ``LlamaCpp``: llama.cpp's "the model's own value" when
#: LangChain chose them (before llama.cpp PR 3401 made 0 mean that); they mean the same here
ROPE_FREQ_BASE_DEFAULT = 10000.0
ROPE_FREQ_SCALE_DEFAULT = 1.0


class LlamaCppParams(BaseModel):
    """``LlamaCpp`` / ``ChatLlamaCpp``'s constructor parameters (see the README's table)."""

    client: Any = Field(default=None, exclude=True)
    """The loaded ``ggml_backend.Llama`` (set at construction, as ``LlamaCpp``'s ``client`` is its
    ``llama_cpp.Llama``). Give one to use it as is: its own settings (``n_ctx``, ...) then stand."""
    model_path: str | None = None
    """Path of the .gguf / ggml .bin file; None means the default model (Qwen2.5-Coder-0.5B-Instruct). Checked
    and loaded at construction (a missing or corrupt file is a ValueError there)."""
    lora_base: str | None = None
    """LoRA adapters are not implemented: a value other than None is refused (ValueError)."""
    lora_path: str | None = None
    """LoRA adapters are not implemented: a value other than None is refused (ValueError)."""
    n_ctx: int = 512
    """Token context window (prompt + completion)."""
    n_parts: int = -1
    """llama.cpp's old multi-part model files: -1 (automatic) or 1; a file is always one part here, so other
    values are refused."""
    seed: int = -1
    """Seed, -1: random. As ``Llama(seed=...)``: set once, each call draws the next seed from it, so calls
    differ and a run of calls reproduces (a per-call ``seed=`` fixes that call's)."""
    f16_kv: bool = True
    """Inert: half-precision key/value cache in llama.cpp; this engine's cache is float32 (at least as exact)."""
    logits_all: bool = False
    """Keep the logits of every evaluated token (``Llama(logits_all=...)``)."""
    vocab_only: bool = False
    """Only the vocabulary: cannot generate, so True is refused (ValueError)."""
    use_mlock: bool = False
    """Inert: the weights stay in a memory map."""
    n_threads: int | None = None
    """CPU threads for evaluation; None: all cores."""
    n_batch: int | None = 512
    """Prompt tokens evaluated per forward pass; None: 512. (``LlamaCpp``'s default 8 is a GPU-memory setting;
    here a small batch only slows the prompt down.)"""
    n_gpu_layers: int | None = None
    """Layers offloaded to an NVIDIA GPU (-1: all; needs ``pip install "ggml-backend[cuda]"``); without CUDA the
    model runs on the CPU (said once on stderr). None: 0."""
    suffix: str | None = None
    """Text after the completion: the prompt becomes a fill-in-the-middle one (models with FIM tokens)."""
    max_tokens: int | None = 256
    """Most tokens to generate; None or <= 0: until the model stops."""
    temperature: float = 0.8
    """Sampling temperature; 0: greedy."""
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    """Our own (``LlamaCpp`` has none and gets llama-cpp-python's default, 0.05)."""
    logprobs: int | None = None
    """How many top log-probabilities per token to return (in ``generation_info["logprobs"]``); None: none."""
    echo: bool = False
    """Put the prompt before the completion."""
    stop: list[str] | None = None
    """Stop strings: the output ends before the first one (a call's ``stop`` adds to these)."""
    repeat_penalty: float = 1.1
    """Penalty on tokens among the last ``last_n_tokens_size``; 1.0: none."""
    last_n_tokens_size: int = 64
    """How many recent tokens ``repeat_penalty`` looks at."""
    use_mmap: bool = True
    """False: the file is read into memory (huge pages where Linux has them: faster decode, slower load) instead
    of memory-mapped. A model already loaded for another instance with the same settings is shared either way."""
    rope_freq_scale: float = ROPE_FREQ_SCALE_DEFAULT
    """RoPE frequency scale; the default 1.0 means the model file's own value, another is used instead of it."""
    rope_freq_base: float = ROPE_FREQ_BASE_DEFAULT
    """RoPE base frequency; the default 10000.0 means the model file's own value, another is used instead of it
    (``model_kwargs={"rope_freq_base": 10000.0}`` forces 10000)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``ggml_backend.Llama(...)`` parameters (llama-cpp-python's names: ``chat_format``, ``n_ubatch``,
    ...); an unknown one is a TypeError at construction. Unknown constructor arguments land here (with
    LangChain's warning), as in ``LlamaCpp``."""
    streaming: bool = True
    """``invoke`` generates through the stream, so callbacks' ``on_llm_new_token`` see every token."""
    grammar_path: str | Path | None = None
    """A GBNF grammar file every completion must follow; give this or ``grammar``, not both."""
    grammar: Any = None
    """A GBNF grammar (llama.cpp's syntax, or a ``LlamaGrammar``) every completion must follow."""
    verbose: bool = True
    """Print loading information to stderr (once per loaded model)."""

    _shared: SharedModel | None = PrivateAttr(default=None)
    _compiled_grammar: LlamaGrammar | None = PrivateAttr(default=None)
    _seed_state: int = PrivateAttr(default=-1)
    _seed_lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _unknown_arguments_to_model_kwargs(cls, values: Any) -> Any:
        """As ``LlamaCpp``: an argument that is no field goes to ``model_kwargs`` (with LangChain's warning), a
        field named in ``model_kwargs`` to its field; ``Llama`` then refuses an unknown one."""
        if isinstance(values, dict):
            values = _build_model_kwargs(dict(values), get_pydantic_field_names(cls))
        return values

    def _check_settings(self) -> None:
        """Refuse, before loading anything, what this engine cannot honour (class-specific checks add to it)."""
        if self.n_parts not in (-1, 1):
            raise ValueError(f"n_parts={self.n_parts}: a model file is always one part here (-1 or 1)")
        if self.grammar is not None and self.grammar_path is not None:
            raise ValueError("give grammar or grammar_path, not both")

    def llama_params(self) -> dict[str, Any]:
        """What ``Llama(...)`` is given, as ``LlamaCpp`` builds it: the model fields, then ``model_kwargs``."""
        params: dict[str, Any] = {
            "n_ctx": self.n_ctx, "n_threads": self.n_threads, "n_batch": 512 if self.n_batch is None else self.n_batch,
            "logits_all": self.logits_all, "vocab_only": self.vocab_only, "use_mlock": self.use_mlock,
            "use_mmap": self.use_mmap, "lora_base": self.lora_base, "lora_path": self.lora_path,
            "rope_freq_base": 0.0 if self.rope_freq_base == ROPE_FREQ_BASE_DEFAULT else self.rope_freq_base,
            "rope_freq_scale": 0.0 if self.rope_freq_scale == ROPE_FREQ_SCALE_DEFAULT else self.rope_freq_scale,
            "verbose": self.verbose}
        if self.n_gpu_layers is not None:
            params["n_gpu_layers"] = self.n_gpu_layers
        params.update(self.model_kwargs)
        return params

    def model_post_init(self, __context: Any) -> None:
        self._check_settings()
        # the grammar is compiled here, so a bad one fails at construction, not at the first call
        if isinstance(self.grammar, str):
            self._compiled_grammar = LlamaGrammar.from_string(self.grammar, verbose=False)
        elif self.grammar is not None:
            if not isinstance(self.grammar, LlamaGrammar):
                raise ValueError(f"grammar must be GBNF text or a LlamaGrammar, got {type(self.grammar).__name__}")
            self._compiled_grammar = self.grammar
        elif self.grammar_path is not None:
            self._compiled_grammar = LlamaGrammar.from_file(self.grammar_path, verbose=False)
        self._seed_state = self.seed
        if self.client is not None:
            if not isinstance(self.client, Llama):
                raise ValueError(f"client must be a ggml_backend.Llama, got {type(self.client).__name__}")
            self._shared = shared_model_of(self.client)
            if self.model_path is None:
                self.model_path = self.client.model_path
        else:
            self._shared = self._load(self.model_path)
            self.client = self._shared.llama

    def _load(self, model_path: str | None) -> SharedModel:
        params = self.llama_params()
        return get_shared_model(model_path, **params)

    @property
    def shared_model(self) -> SharedModel:
        """The loaded model (``client``) with the rules for sharing it between threads."""
        return self._shared

    def _call_seed(self, seed: int | None) -> int | None:
        """A call's seed: its own when given; else the next draw of this instance's chain (as ``Llama`` draws
        from its constructor's seed); None (random) when the instance's seed is -1."""
        if not seed_is_random(seed):
            return seed
        with self._seed_lock:
            if self._seed_state is None or self._seed_state < 0 or seed_is_random(self._seed_state):
                return None
            self._seed_state = next_chain_seed(self._seed_state)
            return self._seed_state
