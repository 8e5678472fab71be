"""Checks of the public API's arguments, in one place, so that ``api.py`` stays a thin layer of calls.

Each function takes what a caller passed and returns it normalized, or raises ``TypeError`` (wrong kind of value)
or ``ValueError`` (right kind, wrong range) with the argument's name in the message: a caller learns which
argument was wrong instead of meeting a ``ZeroDivisionError`` or a numpy message three calls deeper. Sampling
settings are checked by ``SamplingParams`` itself.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}" if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def real(name: str, value: Any, low: float | None = None) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name} must be a finite number{f' >= {low:g}' if low is not None else ''}, got {value}")
    return value


def thread_count(n_threads: Any) -> int:
    """``n_threads`` (None = every core), clamped to the threads numba can run: asking for 1000 on a 2-core
    machine runs 2, and the engine reports 2."""
    import numba
    available = max(1, int(numba.config.NUMBA_NUM_THREADS))
    if n_threads is None:
        return min(available, os.cpu_count() or 1)
    return min(integer("n_threads", n_threads, low=1), available)


def llama_arguments(*, n_ctx: Any, n_batch: Any, n_threads: Any, n_gpu_layers: Any, seed: Any,
                    rope_freq_base: Any, rope_freq_scale: Any, main_gpu: Any = 0) -> tuple[int, int, int]:
    """(n_ctx, n_batch, n_threads) of ``Llama(...)``, checked; the others only checked."""
    n_ctx = integer("n_ctx", n_ctx, low=0)
    n_batch = integer("n_batch", n_batch, low=1)
    integer("n_gpu_layers", n_gpu_layers, low=-1)   # -1 means "all" (llama.cpp); more than the model has: all
    integer("main_gpu", main_gpu, low=0)
    if seed is not None:
        integer("seed", seed, low=-1)
    real("rope_freq_base", rope_freq_base, low=0.0)
    real("rope_freq_scale", rope_freq_scale, low=0.0)
    return n_ctx, n_batch, thread_count(n_threads)


def eval_tokens(tokens: Any, n_vocab: int) -> list[int]:
    """Token ids for ``eval``: a sequence of integers in [0, n_vocab) (an empty one is allowed: nothing to do)."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"tokens must be a sequence of token ids, got {type(tokens).__name__}")
    ids = list(tokens)
    for i, token in enumerate(ids):
        if not _is_int(token):
            raise TypeError(f"tokens[{i}] must be an integer token id, got {type(token).__name__} {token!r}")
    ids = [int(t) for t in ids]
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token ids out of range [0, {n_vocab}): {bad[:5]}")
    return ids


def stop_strings(stop: Any) -> list[str]:
    """``stop``: None, a string, or a list of strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__} {stop!r}"[:200])


def completion_arguments(*, prompt: Any, max_tokens: Any, stop: Any, logprobs: Any, n_keep: Any,
                         stop_tokens: Any) -> tuple[list[str], int | None, int | None, int | None, list | None]:
    """(stop, max_tokens, logprobs, n_keep, stop_tokens) of ``create_completion``, checked."""
    if not isinstance(prompt, (str, bytes, list, tuple, np.ndarray)):
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if max_tokens is not None:
        max_tokens = integer("max_tokens", max_tokens)   # <= 0: no limit, as llama-cpp-python
    if logprobs is not None:
        logprobs = integer("logprobs", logprobs, low=0)
    if n_keep is not None:
        n_keep = integer("n_keep", n_keep, low=-1)
    if stop_tokens is not None:
        if isinstance(stop_tokens, (str, bytes)) or not hasattr(stop_tokens, "__iter__"):
            raise TypeError(f"stop_tokens must be a list of token ids, got {type(stop_tokens).__name__}")
        stop_tokens = [integer(f"stop_tokens[{i}]", t) for i, t in enumerate(stop_tokens)]
    return stop_strings(stop), max_tokens, logprobs, n_keep, stop_tokens
