"""What GGMLLLM and ChatGGML share: one loaded model per file and settings for the whole process (whose scheduler
serves one generation at a time), a prompt-prefix cache, and a bridge that runs a generation in a thread for asyncio
callers.

A model file is loaded once per (path, n_ctx, n_threads, n_batch) and shared by every instance that asks for it:
LangChain code tends to build many model objects (one per chain, per ``bind``), and loading is the costly part.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from ggml_backend import Llama, LlamaRAMCache

#: how many evaluated prompts (their KV caches) each shared model keeps to reuse later prompts' common prefix
PROMPT_CACHE_SLOTS = 8
#: a saved state is loaded only when it shares this many more prompt tokens than the live KV cache does
_MIN_PREFIX_GAIN = 8


class SharedModel:
    """One ``Llama`` and the rules for using it from many threads.

    The model runs each generation on its own worker thread, one request at a time, and any thread may drive or
    close a stream (``Llama``'s scheduler); an abandoned stream does not keep the model from others. The model keeps
    evaluated prompts' states (a ``LlamaRAMCache``, as llama-cpp-python's ``LlamaRAMCache`` does), so alternating
    prompts with a common head (the same system prompt, the same tool list) are evaluated once.
    """

    def __init__(self, llama: Llama):
        self.llama = llama
        if getattr(llama, "_cache", None) is not None:
            return   # a caller's Llama with a prompt cache of its own keeps it
        llama.set_cache(LlamaRAMCache(capacity_states=PROMPT_CACHE_SLOTS, min_gain=_MIN_PREFIX_GAIN))

    @property
    def model_name(self) -> str:
        return model_name_of(self.llama.model_path)

    def stream_completion(self, prompt_tokens: list[int], **completion_kwargs) -> Iterator[dict]:
        """``Llama.create_completion(prompt_tokens, stream=True, ...)`` chunks: a stream that any thread may
        advance or close; closing it (or dropping it) ends the generation and frees the model."""
        return self.llama.create_completion(prompt_tokens, stream=True, **completion_kwargs)


def model_name_of(model_path: str | os.PathLike) -> str:
    """The model's name as reported in metadata: its file name without the extension."""
    return Path(model_path).stem


_models: dict[tuple, SharedModel] = {}
_models_lock = threading.Lock()


def resolve_model_path(model_path: str | os.PathLike | None) -> str:
    if model_path is None:
        from ggml_backend.default_model import default_model_path
        return str(default_model_path(progress=False))
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return str(path.resolve())


#: ``Llama`` parameters that change no number (use_mmap: where the weights' bytes live): not part of a shared model's key
_INERT_LLAMA_PARAMS = frozenset({"verbose", "tensor_split", "use_mmap", "use_mlock",
                                 "n_ubatch", "offload_kqv", "flash_attn", "op_offload", "swa_full", "no_perf"})
#: GPU offload's parameters: part of the key where a CUDA GPU is there to use them, inert (a CPU run) where not
_GPU_PARAMS = frozenset({"n_gpu_layers", "main_gpu"})


@functools.lru_cache(maxsize=1)
def _gpu_usable() -> bool:
    """Whether n_gpu_layers would offload anything here (asked only when a model asks for a GPU: it imports
    numba's CUDA target)."""
    from ggml_backend.cuda import cuda_status
    return cuda_status().available


_LLAMA_DEFAULTS = {name: p.default for name, p in inspect.signature(Llama.__init__).parameters.items()
                   if p.default is not inspect.Parameter.empty}


def _key_value(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def get_shared_model(model_path: str | os.PathLike | None, *, n_ctx: int, n_threads: int | None = None,
                     n_batch: int = 512, verbose: bool = False, **llama_kwargs: Any) -> SharedModel:
    """The process-wide model for these settings, loaded on first use.

    ``llama_kwargs``: more ``Llama(...)`` parameters; those at their default or without effect here do not keep
    instances from sharing a model. A missing or unloadable file, or a setting ``Llama`` refuses
    (``NotImplementedError``), is a ValueError naming the file; an unknown parameter a TypeError."""
    unknown = sorted(set(llama_kwargs) - set(_LLAMA_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown Llama parameter(s) {', '.join(map(repr, unknown))} (from model_kwargs or an "
                        "unknown constructor argument); ggml_backend.Llama takes llama-cpp-python's parameters")
    try:
        path = resolve_model_path(model_path)
    except FileNotFoundError as exc:
        raise ValueError(f"Could not load the model from path {model_path}: {exc}") from exc
    extra = tuple(sorted((name, _key_value(value)) for name, value in llama_kwargs.items()
                         if name not in _INERT_LLAMA_PARAMS and not _same(value, _LLAMA_DEFAULTS[name])
                         and not (name in _GPU_PARAMS and not _gpu_usable())))
    key = (path, int(n_ctx), n_threads, int(n_batch), extra)
    with _models_lock:   # loading under the lock: two threads asking at once must not load the file twice
        shared = _models.get(key)
        if shared is None:
            try:
                llama = Llama(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, verbose=verbose,
                              **llama_kwargs)
            except TypeError:
                raise
            except NotImplementedError as exc:
                raise ValueError(str(exc)) from exc
            except Exception as exc:   # noqa: BLE001 - a missing, truncated or corrupt file, as LlamaCpp words it
                raise ValueError(f"Could not load the model from path {path}: {exc}") from exc
            shared = SharedModel(llama)
            _models[key] = shared
            _by_llama[id(llama)] = shared
        return shared


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default) and type(value) is type(default) or value is default
    except Exception:   # noqa: BLE001 - arrays and the like: not equal to a default
        return False


_by_llama: dict[int, SharedModel] = {}


def shared_model_of(llama: Llama) -> SharedModel:
    """The SharedModel of a ``Llama`` handed in by the caller (``client=``): the one already made for it, else a
    new one (which gives it a prompt cache if it has none)."""
    with _models_lock:
        shared = _by_llama.get(id(llama))
        if shared is None or shared.llama is not llama:
            shared = SharedModel(llama)
            _by_llama[id(llama)] = shared
        return shared


def clear_model_cache() -> None:
    """Forget every shared model (they are freed once no instance uses them)."""
    with _models_lock:
        _models.clear()
        _by_llama.clear()


_DONE = object()


async def aiter_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a worker thread and hand its items to the event loop through a queue.

    The loop stays free while the model computes. If the consumer stops early (break, cancellation), the worker is
    told to stop, closes the iterator (which ends the generation and frees the model) and ends after the item in
    progress.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop_requested = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:   # the loop was closed under us: nobody is listening any more
            stop_requested.set()

    def work() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    if stop_requested.is_set():
                        break
                    put((item, None))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the awaiting side, which re-raises it
            put((_DONE, exc))
            return
        put((_DONE, None))

    worker = threading.Thread(target=work, name="langchain-ggml-generation", daemon=True)
    worker.start()
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop_requested.set()
