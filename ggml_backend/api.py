"""``Llama``: the public face of the engine, shaped like llama-cpp-python's ``Llama`` so its users feel at home."""
from __future__ import annotations

import inspect
import os
from functools import lru_cache
import sys
import time
from collections import deque
from typing import Callable, List

import numpy as np

from .compile_helpers import start_helpers
from .formats import load
from .generation import validate
from .generation.grammar import as_grammar
from .generation.sampling import (LLAMA_DEFAULT_SEED, SamplingParams, derived_seed, next_chain_seed,
                                  seed_is_random)
from .model.forward import Model
from .model.kv_cache import cache_type
from .model.session import InferenceSession, SessionState
from .model.validate import build_hparams, build_tokenizer, check_memory
from .model.scheduler import Stream, TokenStream
from .speculative import MAX_DRAFT, DraftLength, PassTimes, checked_draft

#: what ``save_state()`` captures: the evaluated tokens, their keys/values, the last logits, and the seed the next
#: unseeded generation draws from (the session's state, model/session.py)
LlamaState = SessionState


# llama.cpp's enums' defaults, as llama-cpp-python's constructor takes them
_SPLIT_MODE_LAYER = 1
_UNSPECIFIED = -1

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


class LogitsProcessorList(List[LogitsProcessor]):
    """Logits processors applied in turn, as llama-cpp-python's: each gets (input_ids: np.intc array of the tokens
    evaluated so far, scores: float32 [n_vocab]) and returns the new scores, before the sampler's own stages."""

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(List[StoppingCriteria]):
    """Stopping criteria, as llama-cpp-python's: generation stops when any returns True for (input_ids, logits)."""

    def __call__(self, input_ids: np.ndarray, logits: np.ndarray) -> bool:
        return any([criterion(input_ids, logits) for criterion in self])


class MinTokensLogitsProcessor:
    """Bans the end-of-sequence token until ``min_tokens`` tokens were generated (llama-cpp-python's)."""

    def __init__(self, min_tokens: int, token_eos: int):
        self.min_tokens = min_tokens
        self.token_eos = token_eos
        self.prompt_tokens = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        if len(input_ids) - self.prompt_tokens < self.min_tokens:
            scores[self.token_eos] = -np.inf
        return scores


def _not_supported(name: str, value, why: str) -> NotImplementedError:
    return NotImplementedError(f"{name}={value!r} is not supported by ggml_backend: {why}")


def _check_callable(name: str, value) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable (e.g. a {'LogitsProcessorList' if 'logits' in name else 'StoppingCriteriaList'}), "
                        f"got {type(value).__name__}")


def _return_freed_memory_to_the_system() -> None:
    """Serve allocations from 128 KiB up with their own mmap, so freed activation buffers go back to the system
    instead of staying in glibc's heap: without it, peak RSS after a long prompt carries ~40 MB of freed
    buffers. A process-wide glibc setting (M_MMAP_THRESHOLD), harmless to other code; skipped off glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_return_freed_memory_to_the_system()


class Llama:
    """A loaded model with its tokenizer and generation methods: llama-cpp-python's surface on an
    ``InferenceSession`` (``self.session``, model/session.py), which owns the KV cache, the evaluated tokens, the
    logits and which kernel path each batch takes.

    Thread-safe: every operation on the context's state (``eval``, ``reset``, ``save_state``, ``load_state`` and
    each step of a generation) runs on the session's worker thread, one at a time (see ``model/scheduler.py``). Streams
    (``generate``, ``create_completion(stream=True)``, ``create_chat_completion(stream=True)``) may be advanced from
    any thread, one thread at a time, and closed from any thread; closing one, or dropping it, frees the model.

    The constructor takes llama-cpp-python's parameters with their names and defaults. ``n_ctx=0``,
    ``rope_freq_base=0`` and ``rope_freq_scale=0`` mean "from the file"; ``seed`` -1 or ``LLAMA_DEFAULT_SEED``
    means a random seed. ``n_gpu_layers`` (-1: all) puts the last layers (all of them: and the output layer) on
    NVIDIA GPU ``main_gpu`` with numba's CUDA kernels (the ``cuda`` extra; see ``ggml_backend.cuda``); without
    CUDA it says so once and runs on the CPU. ``use_mmap=False`` reads the file into memory instead of mapping it,
    on huge pages where Linux has them (faster decode, slower load: see ``formats/resident.py``); a MemoryError
    if the memory available cannot hold it. Accepted and inert, because this engine has its own memory layout:
    ``tensor_split``, ``use_mlock``, ``n_ubatch``, ``n_threads_batch`` (``n_threads`` serves both), ``offload_kqv``,
    ``flash_attn``, ``op_offload``, ``swa_full``, ``no_perf``, ``lora_scale`` (without ``lora_path``). ``type_k``/``type_v``: the KV
    cache's types, ggml type ids or names: f16 (1, the default, as llama.cpp's), f32 (0) or q8_0 (8; llama.cpp
    takes a q8_0 ``type_v`` only with flash attention, we take it always). Refused with ``NotImplementedError`` when not at their default:
    ``split_mode``, ``vocab_only``, ``kv_overrides``, ``rope_scaling_type``, ``pooling_type``, ``attention_type``,
    the ``yarn_*`` settings, ``lora_base``/``lora_path``, ``numa``, ``chat_handler``, ``tokenizer``; other
    ``type_k``/``type_v`` are a ValueError. ``embedding`` and ``pooling_type`` are the embeddings API's
    (``embed``, ``create_embedding``; pooling -1 means the file's ``<arch>.pooling_type``, else none).
    ``draft_model`` (a ``LlamaDraftModel`` such as ``LlamaPromptLookupDecoding``) turns on speculative decoding
    for every generation of this context and its ``new_context``s: the same tokens, fewer forward passes where
    the drafts are right (``ggml_backend/speculative.py``).
    On a model's first run on a CPU (its kernels not in numba's cache yet), opening it starts helper processes that
    compile the kinds of forward pass this one has not got to (``compile_helpers.py``;
    ``GGML_BACKEND_COMPILE_HELPERS=0`` starts none); ``_compile_helpers`` holds them.
    Our own: ``n_head_kv`` and ``rms_norm_eps`` for legacy GGML files, which carry neither: ``n_head_kv``
    defaults to what the ``wk`` tensor's shape implies and ``rms_norm_eps`` to 5e-6 (llama.cpp's converter);
    LLaMA-2 models want 1e-5.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *,
                 # model parameters
                 n_gpu_layers: int = 0, split_mode: int = _SPLIT_MODE_LAYER, main_gpu: int = 0,
                 tensor_split: list[float] | None = None, vocab_only: bool = False, use_mmap: bool = True,
                 use_mlock: bool = False, kv_overrides: dict | None = None,
                 # context parameters
                 seed: int = LLAMA_DEFAULT_SEED, n_ctx: int = 512, n_batch: int = 512, n_ubatch: int = 512,
                 n_threads: int | None = None, n_threads_batch: int | None = None,
                 rope_scaling_type: int | None = _UNSPECIFIED, pooling_type: int = _UNSPECIFIED,
                 attention_type: int = _UNSPECIFIED, rope_freq_base: float = 0.0, rope_freq_scale: float = 0.0,
                 yarn_ext_factor: float = -1.0, yarn_attn_factor: float = 1.0, yarn_beta_fast: float = 32.0,
                 yarn_beta_slow: float = 1.0, yarn_orig_ctx: int = 0, logits_all: bool = False,
                 embedding: bool = False, offload_kqv: bool = True, flash_attn: bool = False,
                 op_offload: bool | None = None, swa_full: bool | None = None,
                 # sampling parameters
                 no_perf: bool = False, last_n_tokens_size: int = 64,
                 # LoRA parameters
                 lora_base: str | None = None, lora_scale: float = 1.0, lora_path: str | None = None,
                 # backend parameters
                 numa: bool | int = False,
                 # chat format parameters
                 chat_format: str | None = None, chat_handler=None,
                 # speculative decoding, tokenizer override, KV cache types
                 draft_model=None, tokenizer=None, type_k: int | None = None, type_v: int | None = None,
                 # misc
                 spm_infill: bool = False, verbose: bool = True,
                 # ggml_backend's own (legacy GGML files)
                 n_head_kv: int | None = None, rms_norm_eps: float | None = None):
        refused = {"split_mode": (split_mode, _SPLIT_MODE_LAYER,
                                  "layers are offloaded to one GPU (main_gpu), not split across several"),
                   "vocab_only": (vocab_only, False, "the weights are always loaded (memory-mapped)"),
                   "kv_overrides": (kv_overrides or None, None, "metadata overrides are not implemented"),
                   "rope_scaling_type": (_UNSPECIFIED if rope_scaling_type is None else rope_scaling_type,
                                         _UNSPECIFIED, "RoPE scaling comes from the model file"),
                   "attention_type": (attention_type, _UNSPECIFIED, "attention is always causal"),
                   "yarn_ext_factor": (yarn_ext_factor, -1.0, "YaRN settings come from the model file"),
                   "yarn_attn_factor": (yarn_attn_factor, 1.0, "YaRN settings come from the model file"),
                   "yarn_beta_fast": (yarn_beta_fast, 32.0, "YaRN settings come from the model file"),
                   "yarn_beta_slow": (yarn_beta_slow, 1.0, "YaRN settings come from the model file"),
                   "yarn_orig_ctx": (yarn_orig_ctx, 0, "YaRN settings come from the model file"),
                   "lora_base": (lora_base, None, "LoRA adapters are not implemented"),
                   "lora_path": (lora_path, None, "LoRA adapters are not implemented"),
                   "numa": (bool(numa), False, "NUMA policies are not implemented"),
                   "chat_handler": (chat_handler, None, "use chat_format= (a name, a file or Jinja text)"),
                   "tokenizer": (tokenizer, None, "the model file's own tokenizer is always used")}
        for name, (value, default, why) in refused.items():
            if value != default:
                raise _not_supported(name, value, why)
        if draft_model is not None and not callable(draft_model):
            raise TypeError(f"draft_model must be a LlamaDraftModel (or a callable taking the token ids and "
                            f"returning the drafted ones), got {type(draft_model).__name__}")
        # the KV cache's types, as ggml type ids (llama-cpp-python) or llama.cpp's names ("f16", "q8_0")
        self._cache_types = (cache_type(type_k, "type_k"), cache_type(type_v, "type_v"))
        last_n_tokens_size = validate.integer("last_n_tokens_size", last_n_tokens_size, low=0)
        if n_threads is None and n_threads_batch is not None:
            n_threads = n_threads_batch
        t0 = time.perf_counter()
        n_ctx, n_batch, n_threads = validate.llama_arguments(
            n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu,
            seed=seed, rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale)
        if model_path is None:
            from .default_model import default_model_path
            model_path = default_model_path(progress=verbose)
        self.model_path = str(model_path)
        self.verbose = verbose
        self.model_file = load(model_path, n_head_kv=n_head_kv, rms_eps=rms_norm_eps, in_memory=not use_mmap)
        # one validation pass over the file's hyper-parameters and tensors, and the memory asked, before allocating
        self.hparams = build_hparams(self.model_file, rope_freq_base=rope_freq_base, rope_freq_scale=rope_freq_scale)
        self._n_ctx = n_ctx or self.hparams.n_ctx_train
        check_memory(self.hparams, self._n_ctx, min(n_batch, self._n_ctx), logits_all, self._cache_types,
                     context=None if n_ctx else f"n_ctx=0 (the file's context length {self._n_ctx})")
        self.model = Model(self.model_file, self.hparams)
        if n_gpu_layers:   # before the first KV cache is made: the offloaded layers' caches live on the GPU
            from .cuda import offload_model
            offload_model(self.model, n_gpu_layers, main_gpu, n_ctx=self._n_ctx, n_batch=min(n_batch, self._n_ctx),
                          cache_types=self._cache_types, verbose=verbose)
        self.tokenizer = build_tokenizer(self.model_file)
        self.n_batch = int(n_batch)
        self.n_threads = n_threads
        self.seed = seed
        self._seed = seed   # what the next generation without a seed of its own draws its seed from
        self.logits_all = logits_all
        self.draft_model = draft_model
        self._pass_times = PassTimes()   # speculative decoding's measured pass times (speculative.py)
        self.n_drafted = self.n_draft_accepted = 0   # drafted tokens verified, and accepted, so far
        self.chat_format = chat_format
        self.embedding = bool(embedding)
        from .embeddings import resolve_pooling
        self._pooling_type = resolve_pooling(pooling_type, self.model_file.metadata)
        self.last_n_tokens_size = last_n_tokens_size
        self.spm_infill = bool(spm_infill)
        # llama-cpp-python's flags for recurrent (Mamba) and hybrid (Falcon-H1) models, whose state cannot be
        # truncated to a prefix; this engine runs neither kind, so its KV cache always can be
        self._is_recurrent = False
        self._is_hybrid = False
        self._closed = False
        self._new_context_state()
        self.load_time_s = time.perf_counter() - t0
        # the first run of this model's kernels on this CPU: helper processes compile the other kinds of pass
        self._compile_helpers = [] if n_gpu_layers else start_helpers(self.model, self.model_path, self.n_threads,
                                                                      self._cache_types)
        if verbose:
            hp = self.hparams
            print(f"ggml_backend: loaded {self.model_path} ({self.model_file.format}, {hp.arch.name}, "
                  f"{hp.n_layer} layers, n_embd {hp.n_embd}, vocab {hp.n_vocab}) in {self.load_time_s:.2f} s; "
                  f"n_ctx {self._n_ctx}, {self.n_threads} threads", file=sys.stderr)
            if self._compile_helpers:
                print(f"ggml_backend: first run of this model's kernels on this CPU: numba compiles them once "
                      f"(about a minute), {len(self._compile_helpers)} helper process(es) beside this one",
                      file=sys.stderr)

    def _new_context_state(self) -> None:
        """What each context has of its own: its inference session (KV cache, evaluated tokens, logits, worker
        thread; model/session.py) and prompt cache."""
        self.session = InferenceSession(self.model, self._n_ctx, n_batch=self.n_batch, n_threads=self.n_threads,
                                        cache_types=self._cache_types, logits_all=self.logits_all,
                                        name=self.model_path)
        self.n_batch = self.session.n_batch
        self._cache = None

    def new_context(self, n_ctx: int | None = None) -> "Llama":
        """Another context on the same weights (the memory map, tokenizer and chat template are shared): its own
        KV cache of ``n_ctx`` tokens (default: this one's), evaluated tokens, worker thread and prompt cache.

        Contexts take turns with the weights one forward pass at a time, first come first served, so each
        gives exactly the numbers it would give alone; the server's parallel slots are contexts of one model."""
        if n_ctx is None:
            n_ctx = self._n_ctx
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        check_memory(self.hparams, int(n_ctx), min(self.n_batch, int(n_ctx)), self.logits_all, self._cache_types)
        other = object.__new__(type(self))
        shared = ("model_path", "verbose", "model_file", "metadata", "hparams", "model", "tokenizer", "n_batch",
                  "n_threads", "seed", "_seed", "logits_all", "chat_format", "_file_template", "last_n_tokens_size",
                  "spm_infill", "_metadata_strings", "_closed", "embedding", "_pooling_type", "_cache_types",
                  "draft_model", "_pass_times", "_compile_helpers")
        for name in shared:
            if name in self.__dict__:
                other.__dict__[name] = self.__dict__[name]
        other._n_ctx = int(n_ctx)
        other.load_time_s = 0.0
        other.n_drafted = other.n_draft_accepted = 0
        other._new_context_state()
        return other

    # --- the model, as llama-cpp-python shows it ------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        """The file's metadata as llama-cpp-python gives it: every key to a string (llama.cpp's rendering:
        numbers in decimal, booleans as true/false, arrays as ``[a, b, ...]`` with strings quoted), so
        ``json.dumps(llm.metadata)`` works. The typed values are in ``llm.model_file.metadata``."""
        if self._metadata_strings is None:
            self._metadata_strings = {str(k): _metadata_string(v) for k, v in self.model_file.metadata.items()}
        return self._metadata_strings

    _metadata_strings = None

    def close(self) -> None:
        """Free the KV cache and the model's worker thread (llama-cpp-python's ``close``); the ``Llama`` is unusable
        afterwards. Also what leaving a ``with Llama(...) as llm:`` block does."""
        if self.__dict__.get("_closed", True):
            return
        self._closed = True
        session = self.__dict__.get("session")
        if session is not None:
            session.close()   # open streams end (their next item raises StopIteration), the KV cache is freed

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- vocabulary ---------------------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        """The bytes of ``tokens`` (``prev_tokens`` is accepted and, as in llama-cpp-python's own tokenizer,
        unused: a token's text does not depend on what came before it here either)."""
        return self.tokenizer.decode(list(tokens), skip_special=not special)

    def token_bos(self) -> int:
        return self.tokenizer.bos_id

    def token_eos(self) -> int:
        return self.tokenizer.eos_id

    def token_nl(self) -> int | None:
        """The token whose text is a newline (llama.cpp's linefeed token, for penalize_nl), or None."""
        for token in self.tokenizer.encode("\n", add_bos=False):   # SPM may put a space-prefix token first
            if self.tokenizer.token_to_piece(token) == b"\n":
                return token
        return None

    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_embd(self) -> int:
        return self.hparams.n_embd

    def pooling_type(self) -> int:
        """How ``embed`` pools a text's token vectors: llama.cpp's ``llama_pooling_type`` (0 none, 1 mean, 2 cls,
        3 last), from the constructor's ``pooling_type``, else the file's, else none (see embeddings.py)."""
        return self._pooling_type

    # --- embeddings -----------------------------------------------------------------------------------------
    def embed(self, input, normalize: bool = False, truncate: bool = True, return_count: bool = False):
        """Embeddings of a str (one embedding) or a list of str (a list of them), as llama-cpp-python's
        ``embed``: each text is tokenized as ``tokenize(text)`` does, cut to ``n_batch`` tokens when
        ``truncate`` (else a longer text is a ValueError), and pooled by ``pooling_type()``: one vector of
        ``n_embd`` floats, or with pooling NONE one per token. ``normalize``: L2-normalize each vector.
        ``return_count``: return (embeddings, total number of tokens).

        The vectors are the final hidden states after the output norm (llama.cpp's embeddings). Unlike
        llama-cpp-python this leaves the context alone: each text runs in a KV cache of its own, so a
        generation's state survives, and a text's vector does not depend on the others in the list (see
        embeddings.py). Needs ``Llama(..., embedding=True)``, as there."""
        if not self.embedding:
            raise RuntimeError("Llama model must be created with embedding=True to call this method")
        from .embeddings import embed_texts
        return embed_texts(self, input, pooling_type=self._pooling_type, normalize=normalize, truncate=truncate,
                           return_count=return_count)

    def create_embedding(self, input, model: str | None = None) -> dict:
        """OpenAI-shaped embeddings of a str or a list of str (llama-cpp-python's ``create_embedding``):
        {"object": "list", "data": [{"object": "embedding", "embedding": [...], "index": i}, ...], "model",
        "usage": {"prompt_tokens", "total_tokens"}}. Not normalized, as there."""
        inputs = input if isinstance(input, list) else [input]
        vectors, total_tokens = self.embed(inputs, return_count=True)
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens}}

    # --- evaluation: the inference session's state, as llama-cpp-python shows it -----------------------------
    @property
    def n_tokens(self) -> int:
        """How many tokens are evaluated (in the KV cache)."""
        return self.session.n_tokens

    @property
    def input_ids(self) -> np.ndarray:
        """The evaluated tokens, ``input_ids[:n_tokens]`` (an array of n_ctx int64)."""
        return self.session.input_ids

    @property
    def cache(self):
        """The KV cache (model/kv_cache.py's ``KVCache``; None once closed)."""
        return self.session.cache

    def reset(self) -> None:
        self.session.reset()

    def eval(self, tokens) -> None:
        """Evaluate tokens after the ones already in the KV cache, n_batch at a time."""
        tokens = validate.eval_tokens(tokens, self.hparams.n_vocab)
        self.session.eval(tokens)

    @property
    def scores(self) -> np.ndarray:
        """Logits [n_ctx, n_vocab]: every evaluated row when logits_all, else only row n_tokens-1 is filled.

        Without logits_all the array is made on access (np.zeros pages cost nothing until written), so a long
        context does not keep n_ctx x n_vocab floats resident; each access costs 0.15-0.7 ms (Qwen2.5-0.5B at n_ctx
        2048, the row's page faults included), so a loop reading the last row after each token reads
        ``session.last_logits``, the same numbers without the array."""
        session = self.session
        if session.all_logits is not None:
            return session.all_logits
        scores = np.zeros((self._n_ctx, self.hparams.n_vocab), np.float32)
        if session.last_logits is not None and session.n_tokens:
            scores[session.n_tokens - 1] = session.last_logits
        return scores

    @property
    def eval_tokens(self) -> deque:
        """The evaluated tokens (llama-cpp-python's ``eval_tokens``)."""
        return deque(self.session.tokens.tolist(), maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> deque:
        """The logits rows as lists, as llama-cpp-python's ``eval_logits``: every evaluated position's with
        ``logits_all``, else only the last (a deque of maxlen 1)."""
        session = self.session
        if session.all_logits is not None:
            return deque(session.all_logits[:session.n_tokens].tolist(), maxlen=self._n_ctx)
        rows = [] if session.last_logits is None or not session.n_tokens else [session.last_logits.tolist()]
        return deque(rows, maxlen=1)

    def save_state(self) -> LlamaState:
        state = self.session.save_state()
        state.seed = self._seed
        return state

    def load_state(self, state: LlamaState) -> None:
        self.session.load_state(state)
        if state.seed is not None:
            self._seed = state.seed

    def set_seed(self, seed: int) -> None:
        """The seed the next generation without a ``seed`` of its own draws from (llama-cpp-python's)."""
        self._seed = validate.integer("seed", seed, low=-1)

    def set_cache(self, cache) -> None:
        """Keep evaluated prompts' states in ``cache`` (a ``LlamaRAMCache``; None: no cache), as
        llama-cpp-python's ``set_cache``: a generation first restores the saved state sharing the longest prefix
        with its prompt, and its own state is saved when it ends. Numbers never change (see _prepare_prompt)."""
        self._cache = cache

    # --- generation -----------------------------------------------------------------------------------------
    def reusable_prefix(self, prompt_tokens) -> int:
        """How many leading tokens of ``prompt_tokens`` a generation would take from the KV cache instead of
        evaluating them again (the server reports it as llama.cpp's ``cache_n``): those whose keys/values a
        fresh evaluation would compute the same way (``InferenceSession.reusable_prefix`` says when), so a fixed
        seed gives the same text whether or not the cache was warm."""
        return self.session.reusable_prefix(prompt_tokens)

    def _prepare_prompt(self, prompt_tokens: list[int]) -> None:
        """Make the KV cache hold prompt_tokens, reusing the longest prefix already evaluated that a fresh run
        would compute the same way (``reusable_prefix``), as llama-cpp-python does, so a chat that grows turn by
        turn only evaluates the new turn."""
        n_prompt = len(prompt_tokens)
        if n_prompt > self._n_ctx:
            raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {self._n_ctx}")
        if not prompt_tokens:
            raise ValueError("the prompt is empty (and the model adds no BOS token)")
        n_reuse = self.session.reuse_prefix(prompt_tokens)
        self.eval(prompt_tokens[n_reuse:])   # on the worker: runs at once (and subclasses' eval hooks see it)

    def generate_tokens(self, tokens, *, sampler=None, params=None, max_tokens: int | None = None,
                        n_keep: int | None = None, stop_tokens=None, grammar=None) -> TokenStream:
        """Yield sampled token ids after evaluating ``tokens``, until an end-of-generation token or max_tokens
        (this engine's own generator; ``generate`` is llama-cpp-python's).

        max_tokens None or <= 0 means no limit: when the context fills, it is shifted (n_keep tokens kept) as
        llama.cpp's main does. Each token is computed on the model's worker thread when it is asked for (never
        ahead: a stream closed after a token has not evaluated it); the stream may be advanced from any thread,
        one at a time, and closing it (or dropping it) ends the generation."""
        return self._token_stream(tokens, sampler=sampler, params=params, max_tokens=max_tokens, n_keep=n_keep,
                                  stop_tokens=stop_tokens, grammar=as_grammar(grammar))

    def generate(self, tokens, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                 temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor=None, stopping_criteria=None,
                 grammar=None) -> TokenStream:
        """llama-cpp-python's ``generate``: token ids sampled one after another after evaluating ``tokens``, with
        no end of their own: end-of-generation tokens are yielded like any other (the caller stops), and the
        stream ends only when a ``stopping_criteria`` says so or the context is full. ``reset=True`` starts from
        ``tokens`` (reusing the evaluated prefix they share); ``reset=False`` continues after what was evaluated.

        Differs: the stream is an iterator, not a generator (no ``send``); the seed is the one ``set_seed`` or
        the constructor gave (drawn afresh when random)."""
        grammar = as_grammar(grammar)
        _check_callable("logits_processor", logits_processor)
        _check_callable("stopping_criteria", stopping_criteria)
        tokens = validate.eval_tokens(tokens, self.hparams.n_vocab)
        if not reset:
            tokens = self.session.tokens.tolist() + tokens
        params = SamplingParams(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, tfs_z=tfs_z, typical_p=typical_p,
            repeat_penalty=repeat_penalty, repeat_last_n=self.last_n_tokens_size,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl)
        # the seed set_seed or the constructor gave, not a draw of the chain (a random one: drawn afresh)
        sampler = self.make_sampler(params, seed=-1 if seed_is_random(self._seed) else self._seed)
        return self._token_stream(tokens, sampler=sampler, params=params, max_tokens=None, stop_tokens=[],
                                  logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                  context_shift=False, grammar=grammar)

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
               mirostat_eta: float = 0.1, mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor=None, grammar=None, idx: int | None = None) -> int:
        """llama-cpp-python's ``sample``: one token from the logits after the last evaluated token (or after
        position ``idx``, which needs ``logits_all``), with the last ``last_n_tokens_size`` tokens penalized.
        Nothing is evaluated."""
        if grammar is not None:   # a grammar's state lives in a generation: one token alone has none
            raise _not_supported("grammar", type(grammar).__name__, "use generate() or create_completion(grammar=)")
        _check_callable("logits_processor", logits_processor)
        if self.n_tokens <= 0:
            raise ValueError("sample() needs evaluated tokens: call eval() first")
        params = SamplingParams(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, tfs_z=tfs_z, typical_p=typical_p,
            repeat_penalty=repeat_penalty, repeat_last_n=self.last_n_tokens_size,
            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl)

        session = self.session

        def sample_now():
            n_tokens = session.n_tokens
            end = n_tokens if idx is None else validate.integer("idx", idx, low=0, high=n_tokens - 1) + 1
            if end != n_tokens and session.all_logits is None:
                raise ValueError("sample(idx=...) before the last position needs Llama(logits_all=True)")
            logits = session.logits_at(end)
            input_ids = session.input_ids[:end].astype(np.intc)
            scores = logits.copy()
            if logits_processor is not None:
                scores = np.asarray(logits_processor(input_ids, scores), dtype=np.float32)
            last_n = self.last_n_tokens_size
            return self.make_sampler(params).sample(scores, session.input_ids[max(0, end - last_n):end])

        return session.call(sample_now)

    def _token_stream(self, tokens, *, sampler=None, params=None, max_tokens=None, n_keep=None, stop_tokens=None,
                      with_logits: bool = False, logits_processor=None, stopping_criteria=None,
                      context_shift: bool = True, outcome: dict | None = None, grammar=None) -> TokenStream:
        """generate_tokens()'s stream; with_logits: (token, the logits it was sampled from) pairs.
        ``context_shift`` False: the stream ends when the context is full; ``outcome["stopped"]`` is set when a
        stopping criterion ended it."""
        if params is None:
            params = SamplingParams()
        if sampler is None:
            sampler = self.make_sampler(params)
        stop_ids = set(self.tokenizer.eog_ids) if stop_tokens is None else set(stop_tokens)
        tokens = [int(t) for t in tokens]
        if n_keep is None:
            n_keep = 1 if tokens and tokens[0] == self.tokenizer.bos_id else 0
        work = self._generation_steps(tokens, sampler, params, max_tokens, n_keep, stop_ids, logits_processor,
                                      stopping_criteria, context_shift, outcome if outcome is not None else {},
                                      grammar)
        request = self.session.open(work, on_end=self._cache_generation_end)
        return TokenStream(self.session.scheduler, request, with_logits=with_logits)

    def _generation_steps(self, tokens, sampler, params, max_tokens, n_keep, stop_ids, logits_processor=None,
                          stopping_criteria=None, context_shift=True, outcome=None, grammar=None):
        """The generation itself, advanced one token at a time on the model's worker thread: (token, logits).

        A ``logits_processor`` sees (the evaluated tokens as np.intc, a float32 copy of the logits) and its
        result is what the sampler samples from; the raw logits go with the token (for logprobs). A
        ``stopping_criteria`` is asked after each token is sampled, with the evaluated tokens (not yet that
        one, as in llama-cpp-python) and the logits it was sampled from; True ends the stream without it.
        A ``grammar`` masks the scores (only tokens that keep the output inside it can be sampled) and ends the
        stream when it is complete (``outcome["stopped"]``); its next mask is computed during the forward pass."""
        matcher = grammar.matcher(self.tokenizer) if grammar is not None else None
        session = self.session
        if self._cache is not None:
            state = self._cache.lookup(tokens, session.tokens)
            if state is not None:
                self.load_state(state)   # the public method, as llama-cpp-python (on this worker: runs at once)
        self._prepare_prompt(tokens)
        drafting = None if self.draft_model is None else DraftLength(self._pass_times)

        def sample_after(end: int, logits: np.ndarray):
            """The token sampled from ``logits``, the logits after the first ``end`` evaluated tokens; None when a
            stopping criterion ends the generation instead."""
            last_n = params.repeat_last_n if params.repeat_last_n >= 0 else end
            recent = session.input_ids[max(0, end - last_n):end]
            scores = logits
            if logits_processor is not None:
                scores = np.asarray(logits_processor(session.input_ids[:end].astype(np.intc), logits.copy()),
                                    dtype=np.float32)
            if matcher is not None:
                scores = matcher.mask(scores)
            token = sampler.sample(scores, recent)
            if stopping_criteria is not None and stopping_criteria(session.input_ids[:end].astype(np.intc),
                                                                   logits.copy()):
                if outcome is not None:
                    outcome["stopped"] = True
                return None
            if matcher is not None and token not in stop_ids:
                matcher.accept(token)
            return token

        def ends_after(token: int, n_produced: int) -> bool:
            """Whether the generation ends with ``token``, the ``n_produced``-th token."""
            if token in stop_ids:
                return True
            if matcher is not None and matcher.done():
                if outcome is not None:
                    outcome["stopped"] = True   # the grammar is complete: nothing more may follow
                return True
            # the caller asked for no more: don't pay a forward pass for a token never used
            return max_tokens is not None and 0 < max_tokens <= n_produced

        produced = 0
        # the tokens sampled next: (token, the logits it came from, whether the generation ends with it, decided
        # when it was sampled: the grammar may have moved on since); one at a time in plain decoding, several from
        # one forward pass in a verification of drafted tokens (speculative decoding)
        token = sample_after(session.n_tokens, session.last_logits)
        if token is None:
            return
        ready = [(token, session.last_logits, ends_after(token, 1))]
        stopped = False   # a stopping criterion ended the generation after the tokens in ready
        while ready:
            token, logits, last = ready.pop(0)
            produced += 1
            yield token, logits
            if last:
                return
            if ready:
                continue
            if stopped:
                return
            if session.n_tokens >= self._n_ctx:
                if not context_shift:
                    return
                session.context_shift(n_keep)
            if matcher is not None:
                matcher.prepare()
            left = max_tokens - produced if max_tokens is not None and max_tokens > 0 else None
            ready, stopped = self._decode_step(token, drafting, sample_after,
                                               lambda t, n: ends_after(t, produced + n), left)

    def _decode_step(self, token: int, drafting: DraftLength | None, sample_after, ends_after, left: int | None):
        """Evaluate ``token`` and sample the next one; with speculative decoding (``drafting``) evaluate a draft of
        the tokens after it in the same pass and sample each position in turn while the draft was right
        (speculative.py). Returns the (token, logits, whether the generation ends with it) sampled, the last not
        yet evaluated, with the KV cache cut back to the tokens before it (the state plain decoding would be in);
        and whether a stopping criterion ended the generation after them. ``ends_after(token, n)``: whether the
        n-th token sampled here ends the generation; ``left``: how many more tokens it may produce (None: no
        limit)."""
        session = self.session
        n_tokens = session.n_tokens
        draft = []
        if drafting is not None:
            most = min(MAX_DRAFT, self._n_ctx - n_tokens - 1)
            if left is not None:
                most = min(most, left - 1)   # a pass of k + 1 tokens samples k + 1
            k = drafting.limit(most)
            if most > 0 and (k > 0 or drafting.wants_shadow()):
                context = np.append(session.input_ids[:n_tokens], token).astype(np.intc)
                draft = checked_draft(self.draft_model, context, most, self.hparams.n_vocab)
            if k == 0:   # not worth verifying: followed as a shadow, to see how much of it was right
                if draft:
                    drafting.follow(draft)
                draft = []
            del draft[k:]
        t0 = time.perf_counter()
        if not draft:
            self.eval([token])
            if drafting is not None:
                self._pass_times.record(1, time.perf_counter() - t0)
            sampled = sample_after(session.n_tokens, session.last_logits)
            if sampled is None:
                return [], True
            if drafting is not None:
                drafting.observe(sampled)
            return [(sampled, session.last_logits, ends_after(sampled, 1))], False
        rows = self._eval_every_row([token] + draft)
        self._pass_times.record(len(draft) + 1, time.perf_counter() - t0)
        ready = []
        for i, logits in enumerate(rows):
            end = n_tokens + 1 + i
            sampled = sample_after(end, logits)
            last = sampled is not None and ends_after(sampled, len(ready) + 1)
            if sampled is not None:
                ready.append((sampled, logits, last))
            if sampled is None or last or i == len(draft) or sampled != draft[i]:
                drafting.update(len(draft), i)
                self.n_drafted += len(draft)
                self.n_draft_accepted += i
                session.rewind(end, logits)
                return ready, sampled is None
        raise AssertionError("unreachable: the last row ends the verification")

    def _eval_every_row(self, tokens: list[int]) -> np.ndarray:
        """A verification pass: ``tokens`` evaluated, the logits after each (subclasses time it)."""
        return self.session.eval_every_row(tokens)

    def _cache_generation_end(self, snapshot) -> None:
        """On the worker, when a generation ends: combined forward passes stop waiting for this context, and its
        state goes to the prompt cache (if one is set)."""
        self.session.leave_combined_passes()
        if self._cache is not None:
            self._cache.store(snapshot if snapshot is not None else self.session.save_state())

    def make_sampler(self, params: SamplingParams, seed: int | None = None):
        """A ``Sampler`` of ``params`` for this model's vocabulary, seeded by ``seed`` (default ``params.seed``)
        or, when that is random, by the next draw of this ``Llama``'s seed chain (``_resolve_seed``)."""
        from .generation import Sampler
        return Sampler(params, n_vocab=self.hparams.n_vocab,
                       seed=self._resolve_seed(params.seed if seed is None else seed),
                       newline_token=self.token_nl())

    def _resolve_seed(self, seed):
        """A call's seed: its own when given; else, as llama-cpp-python, the next draw of a chain seeded once by
        the constructor's ``seed`` (or ``set_seed``), so repeated calls differ and a run of them reproduces; None
        (a fresh random seed) when that seed is random (``seed_is_random``, the one rule)."""
        if not seed_is_random(seed):
            return seed
        if seed_is_random(self._seed):
            return None
        self._seed = next_chain_seed(self._seed)
        return self._seed

    def __call__(self, prompt, *args, **kwargs):
        """``create_completion`` (llama-cpp-python's ``__call__``), with the same parameters."""
        return self.create_completion(prompt, *args, **kwargs)

    def create_completion(self, prompt, suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          typical_p: float = 1.0, logprobs: int | None = None, echo: bool = False, stop=None,
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                          repeat_penalty: float = 1.0, top_k: int = 40, stream: bool = False,
                          seed: int | None = None, tfs_z: float = 1.0, mirostat_mode: int = 0,
                          mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                          stopping_criteria=None, logits_processor=None, grammar=None,
                          logit_bias: dict | None = None, *, repeat_last_n: int | None = None,
                          add_bos: bool | None = None, stop_tokens=None, penalize_nl: bool = True,
                          top_a: float = 0.0, repeat_penalty_slope: float = 1.0, n: int = 1,
                          sampling: SamplingParams | None = None):
        """An OpenAI/llama-cpp-python-shaped text completion (a dict, or an iterator of chunks if stream).

        llama-cpp-python's parameters, with its meaning: ``max_tokens`` None or <= 0 generates until the context
        is full (finish_reason "length"), and no more than the context holds in any case; a prompt of n_ctx
        tokens or more is a ValueError. ``suffix`` asks for fill-in-the-middle, for models whose vocabulary
        has the FIM tokens (a ValueError otherwise). ``grammar`` (a ``LlamaGrammar``) constrains every sampled
        token and ends the completion when it is complete.
        Differs: ``logprobs`` works without ``logits_all``.

        Our own, keyword-only: ``repeat_last_n`` (penalty window; default the constructor's
        ``last_n_tokens_size``, -1 = the whole context), ``add_bos`` (for a text prompt; default the model's),
        ``stop_tokens`` (token ids that end the generation; default the model's end-of-generation tokens),
        ``penalize_nl``, and KoboldCpp's ``top_a`` and ``repeat_penalty_slope`` (see ``SamplingParams``), and
        OpenAI's ``n``: that many completions of the prompt (choices with index 0..n-1, in stream chunks too),
        decoded together by a ``ContinuousBatcher``; the prompt is evaluated once and its keys/values copied to
        each. With a seed, choice i samples with seed + i (choice 0 is the n=1 completion) and reproduces; the
        usage counts the tokens of every choice. ``n > 1`` runs in KV caches of its own: the context's cache and
        prompt cache are left as they were. ``sampling``: the sampling settings as one ``SamplingParams`` (used
        as it is: its ``repeat_last_n`` and ``repeat_penalty`` too), instead of the keywords; a sampling keyword
        given with a value other than its default overrides that field (``_with_overrides``)."""
        n = validate.integer("n", n, low=1)
        grammar = as_grammar(grammar)
        _check_callable("logits_processor", logits_processor)
        _check_callable("stopping_criteria", stopping_criteria)
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError(f"suffix must be a string, got {type(suffix).__name__}")
        stop, max_tokens, logprobs, _, stop_tokens = validate.completion_arguments(
            prompt=prompt, max_tokens=max_tokens, stop=stop, logprobs=logprobs, n_keep=None, stop_tokens=stop_tokens)
        keywords = dict(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, tfs_z=tfs_z, typical_p=typical_p,
            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, mirostat_mode=mirostat_mode, mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta, logit_bias=logit_bias, seed=seed, penalize_nl=penalize_nl, top_a=top_a,
            repeat_penalty_slope=repeat_penalty_slope)
        if sampling is not None:
            params = _with_overrides(sampling, Llama.create_completion, keywords)
        else:
            if repeat_last_n is None:
                keywords["repeat_last_n"] = self.last_n_tokens_size
            params = SamplingParams(**keywords)
        if add_bos is None:
            add_bos = self.tokenizer.add_bos
        if suffix is not None:
            prompt_tokens = self._infill_tokens(prompt, suffix, add_bos)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            prompt_tokens = [int(t) for t in prompt]
        else:
            prompt_tokens = self.tokenize(prompt, add_bos=add_bos, special=True)
        if len(prompt_tokens) >= self._n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt_tokens)}) exceed context window of {self._n_ctx}")
        room = self._n_ctx - len(prompt_tokens)
        max_tokens = room if max_tokens is None or max_tokens <= 0 else min(max_tokens, room)
        if n > 1:
            steps = self._batched_completions(prompt_tokens, n, params, max_tokens, stop,
                                              self._eog_ids(stop_tokens), logits_processor, stopping_criteria,
                                              grammar)
            stream_iter = Stream(self._completion_stream_n(steps, prompt_tokens, echo, logprobs, model, n,
                                                           self._eog_ids(stop_tokens)), steps)
            return stream_iter if stream else collect_completion(stream_iter)
        outcome: dict = {}
        tokens = self._token_stream(prompt_tokens, sampler=self.make_sampler(params), params=params,
                                    max_tokens=max_tokens, stop_tokens=self._eog_ids(stop_tokens),
                                    with_logits=True, logits_processor=logits_processor,
                                    stopping_criteria=stopping_criteria, context_shift=False, outcome=outcome,
                                    grammar=grammar)
        stream_iter = Stream(self._completion_stream(tokens, prompt_tokens, stop, echo, logprobs, model, stop_tokens,
                                                     outcome), tokens)
        return stream_iter if stream else collect_completion(stream_iter)

    def _batched_completions(self, prompt_tokens, n, params, max_tokens, stop, stop_ids, logits_processor,
                             stopping_criteria, grammar) -> "_StepStream":
        """create_completion(n > 1)'s steps on the worker thread: lists of ``SequenceEvent``s, choice i being
        sequence i of a ``ContinuousBatcher`` that shares choice 0's evaluated prompt."""
        from .continuous_batching import ContinuousBatcher
        base = self._resolve_seed(params.seed)   # once: choice i then uses base + i
        seeds = [derived_seed(base, i) for i in range(n)]

        def steps():
            batcher = ContinuousBatcher(self, max_sequences=n)
            try:
                first = None
                for i in range(n):
                    seq_id = batcher.add(prompt_tokens, max_tokens=max_tokens, stop=stop, stop_tokens=stop_ids,
                                         params=params, seed=seeds[i], grammar=grammar,
                                         logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                         share_prefix_with=first)
                    first = seq_id if first is None else first
                while batcher.active:
                    yield batcher.step()
            finally:   # a stream closed early: every sequence's memory goes back now
                for seq_id in list(batcher.sequences):
                    batcher.cancel(seq_id)
        request = self.session.open(steps())
        return _StepStream(self.session.scheduler, request)

    def _completion_stream_n(self, steps, prompt_tokens, echo, logprobs, model_name, n, stop_ids):
        """Completion chunks of n choices from a batcher's steps (``_completion_stream``'s, with their index)."""
        import uuid
        completion_id = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model_name or self.model_path

        def chunk(index, text, finish_reason=None, lp=None):
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": finish_reason}]}

        if echo:
            echo_text = self.detokenize(prompt_tokens, special=True).decode("utf-8", errors="replace")
            for i in range(n):
                yield chunk(i, echo_text)
        n_generated = [0] * n
        text_offset = [0] * n
        open_choices = n
        for events in steps:
            for event in events:
                i = event.seq_id
                lp = None
                if event.token is not None:
                    n_generated[i] += 1
                    if logprobs is not None and event.token not in stop_ids:
                        lp = self._logprobs_entry(event.token, event.logits, logprobs, text_offset[i])
                text_offset[i] += len(event.text)
                if event.finish_reason is None:
                    if event.text or lp:
                        yield chunk(i, event.text, lp=lp)
                    continue
                out = chunk(i, event.text, event.finish_reason, lp)
                open_choices -= 1
                if not open_choices:
                    total = sum(n_generated)
                    out["usage"] = {"prompt_tokens": len(prompt_tokens), "completion_tokens": total,
                                    "total_tokens": len(prompt_tokens) + total}
                yield out
        steps.close()

    def _logprobs_entry(self, token, logits, logprobs, text_offset) -> dict:
        """One token's completion logprobs: its log-probability and the top ``logprobs`` alternatives."""
        from .generation import log_softmax, top_logprobs
        piece = self.tokenizer.token_to_piece(token)
        return {"tokens": [piece.decode("utf-8", errors="replace")], "text_offset": [text_offset],
                "token_logprobs": [float(log_softmax(logits)[token])],
                "top_logprobs": [{self.tokenizer.token_to_piece(i).decode("utf-8", errors="replace"): float(v)
                                  for i, v in top_logprobs(logits, max(1, int(logprobs)))}]}

    _FIM_NAMES = {"pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>"),
                  "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>"),
                  "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "▁<MID>")}
    _FIM_KEYS = {"pre": ("fim_pre_token_id", "prefix_token_id"), "suf": ("fim_suf_token_id", "suffix_token_id"),
                 "mid": ("fim_mid_token_id", "middle_token_id")}

    def _fim_token(self, which: str) -> int | None:
        meta = self.model_file.metadata
        for key in self._FIM_KEYS[which]:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and 0 <= int(value) < self.hparams.n_vocab:
                return int(value)
        for name in self._FIM_NAMES[which]:
            token = self.tokenizer._token_to_id.get(name)
            if token is not None:
                return int(token)
        return None

    def _infill_tokens(self, prompt, suffix: str, add_bos: bool) -> list[int]:
        """The fill-in-the-middle prompt: [BOS] <PRE> prompt <SUF> suffix <MID> (``spm_infill``: suffix first),
        as llama.cpp's infill."""
        pre, suf, mid = (self._fim_token(w) for w in ("pre", "suf", "mid"))
        if pre is None or suf is None or mid is None:
            raise ValueError("suffix (fill-in-the-middle) needs a model whose vocabulary has the FIM prefix, "
                             "suffix and middle tokens; this one has not")
        prefix_ids = ([int(t) for t in prompt] if isinstance(prompt, (list, tuple, np.ndarray))
                      else self.tokenize(prompt, add_bos=False, special=False) if prompt else [])
        suffix_ids = self.tokenize(suffix, add_bos=False, special=False) if suffix else []
        bos = [self.tokenizer.bos_id] if add_bos and self.tokenizer.add_bos and self.tokenizer.bos_id is not None else []
        if self.spm_infill:
            return bos + [suf] + suffix_ids + [pre] + prefix_ids + [mid]
        return bos + [pre] + prefix_ids + [suf] + suffix_ids + [mid]

    def _eog_ids(self, stop_tokens) -> set[int]:
        return set(self.tokenizer.eog_ids) if stop_tokens is None else set(stop_tokens)

    def _completion_stream(self, tokens: TokenStream, prompt_tokens, stop, echo, logprobs, model_name, stop_tokens,
                           outcome=None):
        """Completion chunks from a (token, logits) stream; runs in the consumer's thread, the model in its own."""
        import uuid
        from .generation import StopReason, TokenTextStream
        completion_id = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model_name or self.model_path
        output = TokenTextStream(self.tokenizer, stop, eog_ids=self._eog_ids(stop_tokens))

        def chunk(text, finish_reason=None, usage=None, lp=None):
            out = {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish_reason}]}
            if usage is not None:
                out["usage"] = usage
            return out

        if echo:
            echo_text = self.detokenize(prompt_tokens, special=True).decode("utf-8", errors="replace")
            yield chunk(echo_text)
        text_offset = 0
        for token, logits in tokens:
            text = output.feed(token)
            if output.stop_reason == StopReason.EOG:
                break   # the end token has no text and no logprobs entry
            lp = None
            if logprobs is not None and logits is not None:
                # the logits this token was sampled from (the stream hands them over with it)
                lp = self._logprobs_entry(token, logits, logprobs, text_offset)
            if text or lp:
                text_offset += len(text)
                yield chunk(text, lp=lp)
            if output.done:
                break
        tokens.close()   # ended here (a stop string, an end token): the model is free before the last chunk
        # the token stream ran dry: a stopping criterion or a complete grammar ended it, else the budget or context
        tail = output.finish(StopReason.CRITERION if outcome and outcome.get("stopped") else StopReason.LENGTH)
        usage = {"prompt_tokens": len(prompt_tokens), "completion_tokens": output.n_tokens,
                 "total_tokens": len(prompt_tokens) + output.n_tokens}
        yield chunk(tail, finish_reason=output.finish_reason, usage=usage)


    # --- chat -----------------------------------------------------------------------------------------------
    def chat_template(self, template=None):
        """The chat template to use: ``template`` (a name, file or Jinja text), else the constructor's
        ``chat_format``, else the model file's own (``tokenizer.chat_template``, rendered in a sandbox), else
        ChatML."""
        from .templates import JinjaTemplate, get_template
        spec = template or self.chat_format
        if spec is not None:
            return get_template(spec, bos_token=self._token_text(self.tokenizer.bos_id),
                                eos_token=self._token_text(self.tokenizer.eos_id))
        if self.model_file.metadata.get("tokenizer.chat_template"):
            if self._file_template is None:
                self._file_template = JinjaTemplate.from_gguf_metadata(self.model_file.metadata)
            return self._file_template
        return get_template("chatml")

    _file_template = None

    def _token_text(self, token_id: int | None) -> str:
        """A special token's text ('' when the vocabulary has no such token)."""
        if token_id is None:
            return ""
        return self.tokenizer.token_to_piece(token_id).decode("utf-8", "replace")

    def render_chat_prompt(self, messages, *, template=None, tools=None, add_generation_prompt=True,
                           continue_final_message=False) -> tuple[list[int], list[str], str]:
        """(prompt tokens, the template's stop strings, prompt text) for a list of chat messages."""
        tmpl = self.chat_template(template)
        kwargs = {"continue_final_message": True} if continue_final_message else {}
        text = tmpl.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        bos_text = self._token_text(self.tokenizer.bos_id)
        # a template that writes the BOS text itself must not get a second BOS from the tokenizer
        add_bos = self.tokenizer.add_bos and not (bos_text and text.startswith(bos_text))
        tokens = self.tokenize(text, add_bos=add_bos, special=True)
        return tokens, list(tmpl.stop_strings), text

    def create_chat_completion(self, messages, functions=None, function_call=None, tools=None, tool_choice=None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False, stop=None,
                               seed: int | None = None, response_format: dict | None = None,
                               max_tokens: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0, tfs_z: float = 1.0,
                               mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: str | None = None, logits_processor=None, grammar=None,
                               logit_bias: dict | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, *, chat_template=None,
                               repeat_last_n: int | None = None, penalize_nl: bool = True, n: int = 1,
                               sampling: SamplingParams | None = None):
        """An OpenAI/llama-cpp-python-shaped chat completion, on the model's own chat template (or a chosen one).

        llama-cpp-python's parameters in its order. With ``tools`` (OpenAI function specs) the template is asked
        to describe them (Qwen2.5's does), and ``<tool_call>`` blocks in the reply come back as
        ``message.tool_calls``; the legacy ``functions``/``function_call`` are the same as tools/tool_choice.
        ``response_format`` (``{"type": "json_object"}`` with or without a ``"schema"``, OpenAI's
        ``{"type": "json_schema", "json_schema": {...}}``) or a ``grammar`` constrains the reply; a forced
        ``tool_choice`` ("required" or a named function) constrains it to a call whose arguments validate against
        the tool's parameters, and with "auto" a call that the model starts is held to the same (generation/
        grammar.py). Our own, keyword-only: ``chat_template`` (a name, file or
        Jinja text for this call), ``repeat_last_n``, ``penalize_nl``, OpenAI's ``n`` (that many choices,
        decoded together; see ``create_completion``), and ``sampling``: the sampling settings as one
        ``SamplingParams``, as ``create_completion`` takes it (a sampling keyword given with a value other than
        its default here overrides that field)."""
        from .generation.grammar import forced_call_grammar, grammar_from_response_format, tool_call_grammar
        grammar = as_grammar(grammar)
        n = validate.integer("n", n, low=1)
        keywords = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                        seed=seed, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        repeat_penalty=repeat_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                        mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, logit_bias=logit_bias,
                        repeat_last_n=repeat_last_n, penalize_nl=penalize_nl)
        if sampling is not None:   # one SamplingParams for create_completion, this method's keywords applied
            keywords = {"sampling": _with_overrides(sampling, Llama.create_chat_completion, keywords)}
        if (chat_template or self.chat_format) == "chatml-function-calling":
            if n != 1:
                raise _not_supported("n", n, "chatml-function-calling makes one reply at a time")
            return self._chatml_function_calling(
                messages, functions, function_call, tools, tool_choice, stream, grammar, response_format,
                dict(keywords, stop=stop, max_tokens=max_tokens, model=model, logits_processor=logits_processor),
                logprobs)
        format_grammar = grammar_from_response_format(response_format)
        if format_grammar is not None:
            if grammar is not None:
                raise ValueError("give grammar or a JSON response_format, not both")
            grammar = format_grammar
        tools, tool_choice = _legacy_functions(functions, function_call, tools, tool_choice)
        import uuid
        from .templates.tool_calls import CALL_CLOSE
        forced = forced_call_grammar(tools or [], tool_choice)   # a ValueError for a choice naming no tool
        prefill = ""
        if forced is not None:
            if grammar is not None:
                raise ValueError("a forced tool_choice constrains the reply already: give no grammar or JSON "
                                 "response_format with it")
            prefill, grammar = forced
        elif tools and tool_choice != "none" and grammar is None:
            grammar = tool_call_grammar(tools, self.tokenizer)   # a call the model starts is held to the tools
        if tool_choice == "none":
            tools = None
        prompt_tokens, template_stops, _ = self.render_chat_prompt(messages, template=chat_template, tools=tools)
        stops = template_stops + validate.stop_strings(stop)
        if prefill:   # a forced call: the reply starts with it, written for the model, and ends when it closes
            prompt_tokens = prompt_tokens + self.tokenize(prefill, add_bos=False, special=True)
            stops.append(CALL_CLOSE)
        completion = self.create_completion(
            prompt_tokens, max_tokens=max_tokens, stream=True, stop=stops, model=model,
            logprobs=max(1, int(top_logprobs or 0)) if logprobs else None, logits_processor=logits_processor,
            grammar=grammar, n=n, **keywords)
        chat_id = f"chatcmpl-{uuid.uuid4()}"
        chunks = Stream(self._chat_stream(completion, chat_id, tools, prefill, int(top_logprobs or 0)), completion)
        return chunks if stream else collect_chat(chunks)

    def create_chat_completion_openai_v1(self, *args, **kwargs):
        """llama-cpp-python's ``create_chat_completion_openai_v1``: ``create_chat_completion(*args, **kwargs)``
        with the reply as the ``openai`` package's types, a ``ChatCompletion``, or with ``stream=True`` an
        iterator of ``ChatCompletionChunk`` (closing it, or dropping it, ends the generation). Needs ``pip install
        openai`` (an ImportError saying so without it)."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("create_chat_completion_openai_v1 returns the openai package's types: pip install "
                              "openai") from None
        stream = inspect.signature(self.create_chat_completion).bind(*args, **kwargs).arguments.get("stream", False)
        result = self.create_chat_completion(*args, **kwargs)
        if not stream:
            return ChatCompletion.model_validate(result)

        def chunks():
            try:
                for chunk in result:
                    yield ChatCompletionChunk.model_validate(chunk)
            finally:
                result.close()
        return chunks()

    def _chatml_function_calling(self, messages, functions, function_call, tools, tool_choice, stream, grammar,
                                 response_format, sampling, logprobs):
        """``chat_format="chatml-function-calling"``: llama-cpp-python's protocol (see function_calling.py)."""
        from . import function_calling
        if grammar is not None or (response_format or {}).get("type", "text") != "text" or logprobs:
            raise _not_supported("grammar/response_format/logprobs", "with chatml-function-calling",
                                 "this chat format constrains each step itself and reports no logprobs")
        tools, tool_choice = _legacy_functions(functions, function_call, tools, tool_choice)
        return function_calling.chat_completion(self, messages, tools, tool_choice or "auto", stream, sampling)

    @staticmethod
    def _chat_stream(chunks, chat_id, tools, prefill: str, n_top: int):
        """Chat deltas from completion chunks: text as it comes, and with tools each call as one ``tool_calls``
        delta once its block closes (text that may open a block is held back until it is clear either way).
        Each choice index (``n > 1``) has its own state and keeps its index."""
        from .templates.tool_calls import ToolCallSplitter
        states: dict = {}
        for chunk in chunks:
            choice = chunk["choices"][0]
            index = choice.get("index", 0)
            base = {"id": chat_id, "object": "chat.completion.chunk", "created": chunk["created"],
                    "model": chunk["model"]}
            state = states.get(index)
            if state is None:
                splitter = ToolCallSplitter(parse_calls=bool(tools), prefill=prefill, tools=tools or [])
                state = states[index] = {"splitter": splitter, "n_calls": 0}
                yield {**base, "choices": [{"index": index, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}]}
            splitter = state["splitter"]
            finish_reason = choice["finish_reason"]
            pieces = splitter.feed(choice["text"])
            if finish_reason is not None:
                last_pieces, finish_reason = splitter.end(finish_reason)   # a forced call closed, "tool_calls"
                pieces += last_pieces
            deltas = []
            for kind, value in pieces:
                if kind == "call":
                    deltas.append({"tool_calls": [{"index": state["n_calls"], **_tool_call(value)}]})
                    state["n_calls"] += 1
                elif value and deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += value
                elif value:
                    deltas.append({"content": value})
            logprobs = _chat_logprobs(choice.get("logprobs"), n_top)
            if not deltas and (logprobs or finish_reason is not None):
                deltas.append({})
            for i, delta in enumerate(deltas):
                last = i == len(deltas) - 1
                out = {**base, "choices": [{"index": index, "delta": delta,
                                            "logprobs": logprobs if i == 0 else None,
                                            "finish_reason": finish_reason if last else None}]}
                if last and "usage" in chunk:
                    out["usage"] = chunk["usage"]
                yield out


@lru_cache(maxsize=None)
def _sampling_defaults(method) -> dict:
    """The default of each keyword of ``method`` (create_completion, create_chat_completion)."""
    return {name: parameter.default for name, parameter in inspect.signature(method).parameters.items()}


def _with_overrides(sampling, method, keywords: dict) -> SamplingParams:
    """``sampling`` (a SamplingParams) with the sampling ``keywords`` of a ``method`` call applied where they
    differ from the method's defaults: a keyword left at its default leaves the field as ``sampling`` has it
    (the keywords cannot tell "not given" from "given its default", so this is the rule)."""
    import dataclasses
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    defaults = _sampling_defaults(method)
    changed = {name: value for name, value in keywords.items()
               if not (value is defaults[name] or value == defaults[name])}
    return dataclasses.replace(sampling, **changed) if changed else sampling


class _StepStream(TokenStream):
    """The worker-side steps of ``create_completion(n > 1)`` (lists of ``SequenceEvent``s), with a
    ``TokenStream``'s guarantees: any thread may advance it, one at a time, and closing it ends the generation."""

    def __next__(self):
        return self._scheduler.next_item(self._request)


def _metadata_string(value) -> str:
    """One metadata value as llama.cpp's gguf_kv_to_str writes it."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):f}"
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = []
        for item in value:
            if isinstance(item, (str, bytes, bytearray)):
                text = item if isinstance(item, str) else bytes(item).decode("utf-8", "replace")
                parts.append('"' + text.replace('"', '\\"') + '"')
            elif isinstance(item, (list, tuple, np.ndarray)):
                parts.append("???")
            else:
                parts.append(_metadata_string(item))
        return "[" + ", ".join(parts) + "]"
    return str(value)


def _legacy_functions(functions, function_call, tools, tool_choice):
    """(tools, tool_choice) with OpenAI's legacy ``functions`` / ``function_call`` mapped onto them."""
    if functions is None:
        if function_call is not None:
            raise ValueError("function_call needs functions")
        return tools, tool_choice
    if tools is not None:
        raise ValueError("give tools or the legacy functions, not both")
    tools = [{"type": "function", "function": f} for f in functions]
    if function_call is not None and tool_choice is None:
        tool_choice = (function_call if isinstance(function_call, str)
                       else {"type": "function", "function": {"name": function_call["name"]}})
    return tools, tool_choice


def _tool_call(call: dict) -> dict:
    """One parsed call in OpenAI's shape (arguments as a JSON string, an id the reply can name)."""
    import json
    import uuid
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def _chat_logprobs(completion_logprobs, n_top: int):
    """A completion's logprobs ({tokens, token_logprobs, top_logprobs}) in the chat shape: {"content": [{token,
    logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...n_top]}]}."""
    if not completion_logprobs:
        return None
    content = []
    for token, logprob, top in zip(completion_logprobs["tokens"], completion_logprobs["token_logprobs"],
                                   completion_logprobs["top_logprobs"]):
        alternatives = sorted((top or {}).items(), key=lambda item: -item[1])[:n_top]
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                         for t, lp in alternatives]})
    return {"content": content}


def collect_completion(chunks) -> dict:
    """A whole text completion from its stream of chunks (what ``create_completion`` returns without stream):
    one choice per index the chunks carry (``n > 1``: several), in index order."""
    texts, finish_reasons, logprob_data, usage, chunk = {}, {}, {}, None, None
    for chunk in chunks:
        choice = chunk["choices"][0]
        index = choice.get("index", 0)
        texts.setdefault(index, []).append(choice["text"])
        if choice["finish_reason"] is not None:
            finish_reasons[index] = choice["finish_reason"]
        if chunk.get("usage"):
            usage = chunk["usage"]
        if choice.get("logprobs"):
            part = choice["logprobs"]
            data = logprob_data.setdefault(index, {k: [] for k in part})
            for k, v in part.items():
                data[k].extend(v)
    return {
        "id": chunk["id"], "object": "text_completion", "created": chunk["created"], "model": chunk["model"],
        "choices": [{"text": "".join(texts[i]), "index": i, "logprobs": logprob_data.get(i),
                     "finish_reason": finish_reasons.get(i)} for i in sorted(texts)],
        "usage": usage,
    }


def collect_chat(chunks) -> dict:
    """A whole chat completion from its stream of deltas (what ``create_chat_completion`` returns without
    stream): content joined, tool calls merged by index as OpenAI's clients merge them; one choice per choice
    index the chunks carry (``n > 1``: several), in index order."""
    parts: dict = {}
    usage, chunk = None, None
    for chunk in chunks:
        if "usage" in chunk:
            usage = chunk["usage"]
        if not chunk["choices"]:
            continue
        choice = chunk["choices"][0]
        part = parts.setdefault(choice.get("index", 0), {"content": [], "calls": {}, "logprobs": None,
                                                        "finish_reason": None})
        delta = choice["delta"]
        if delta.get("content"):
            part["content"].append(delta["content"])
        for call in delta.get("tool_calls") or ():
            merged = part["calls"].setdefault(call["index"], {"id": call.get("id"), "type": "function",
                                                              "function": {"name": "", "arguments": ""}})
            merged["function"]["name"] += call["function"].get("name") or ""
            merged["function"]["arguments"] += call["function"].get("arguments") or ""
        if choice.get("logprobs"):
            part["logprobs"] = (part["logprobs"] or []) + choice["logprobs"]["content"]
        if choice["finish_reason"] is not None:
            part["finish_reason"] = choice["finish_reason"]
    choices = []
    for index in sorted(parts):
        part = parts[index]
        text = "".join(part["content"])
        message = {"role": "assistant", "content": text}
        if part["calls"]:
            message["content"] = text.strip() or None
            message["tool_calls"] = [part["calls"][i] for i in sorted(part["calls"])]
        choices.append({"index": index, "message": message,
                        "logprobs": None if part["logprobs"] is None else {"content": part["logprobs"]},
                        "finish_reason": part["finish_reason"]})
    return {"id": chunk["id"], "object": "chat.completion", "created": chunk["created"], "model": chunk["model"],
            "choices": choices, "usage": usage}
