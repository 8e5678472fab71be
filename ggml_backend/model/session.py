"""``InferenceSession``: one context's state on a model's weights, and the only place that knows which kernel path
a batch of tokens takes.

A session owns what a context has of its own: its KV cache, the evaluated tokens (``input_ids[:n_tokens]``), how
each position's keys/values were computed (``numerics``, what decides whether a later prompt may reuse them), the
logits after the last evaluated token (and every position's with ``logits_all``), and the ``Scheduler`` whose
worker thread runs every operation on that state, one at a time (``scheduler.py`` says why a worker thread and not
a lock). Its operations: ``eval`` (split into the batches whose numbers do not depend on how a prompt arrives),
``eval_every_row`` and ``rewind`` (speculative decoding), ``truncate``, ``reuse_prefix``, ``context_shift``,
``save_state``/``load_state``, and ``sequence_cache`` for many sequences at once (the ``ContinuousBatcher``'s,
``create_completion(n > 1)``'s).

Every public method may be called from any thread: it runs on the session's worker (at once when called there, as
the steps of a generation are). ``api.Llama`` is a facade of llama-cpp-python's surface on top of a session;
nothing above ``model/`` reads ``BLAS_MIN_TOKENS`` or the numerics flags: they ask ``runs_alone`` and
``eval_batches`` here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..quant.matmul import BLAS_MIN_TOKENS
from .kv_cache import DEFAULT_CACHE_TYPE, MultiSequenceCache
from .scheduler import Scheduler

# how a KV cache position was computed (InferenceSession.numerics): by the integer kernels (one token, or a batch
# below BLAS_MIN_TOKENS: the same numbers either way), by a batch on the BLAS path, or by neither (keys re-rotated
# by a context shift)
INT_NUMERICS, BATCH_NUMERICS, NO_FRESH_NUMERICS = 0, 1, 2
#: the most tokens ``eval_every_row`` takes in one pass with each row equal to evaluating its token alone
MAX_EVERY_ROW = BLAS_MIN_TOKENS - 1


@dataclass
class SessionState:
    """What ``save_state()`` captures: the evaluated tokens, their keys/values and the last logits; ``seed`` is
    the facade's (``Llama``: the seed its next unseeded generation draws from, llama-cpp-python's too).
    ``api.LlamaState`` is this class."""
    input_ids: np.ndarray
    numerics: np.ndarray
    kv: dict
    last_logits: np.ndarray | None
    all_logits: np.ndarray | None
    seed: int | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def set_threads(n_threads: int) -> None:
    """numba's thread count for the calling thread (it is per thread), capped at the threads numba started."""
    import numba
    numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))


def prompt_kernels_from() -> int:
    """The fewest tokens a batch needs to take the prompt path (the BLAS path or the integer GEMM): what a warm-up
    evaluates so that timed prompts find those kernels loaded (``ggml-backend bench``)."""
    return BLAS_MIN_TOKENS


def runs_alone(n_tokens: int) -> bool:
    """Whether a batch of ``n_tokens`` takes the BLAS path, whose float summation order depends on the batch, so
    it runs in a forward pass of its own; fewer tokens go through the integer kernels, which give each token the
    numbers it gets alone, so such batches may be combined with others (model/batching.py)."""
    return n_tokens >= BLAS_MIN_TOKENS


def eval_batches(first: int, last: int, n_batch: int) -> list[tuple[int, int]]:
    """Tokens first..last-1 in the batches ``eval`` uses: near-equal ones of at most n_batch tokens (no short
    tail batch that would take other numerics)."""
    n = last - first
    if n <= 0:
        return []
    n_batches = -(-n // n_batch)
    bounds = [first + n * i // n_batches for i in range(n_batches + 1)]
    return list(zip(bounds, bounds[1:]))


class InferenceSession:
    """One context on ``model``'s weights: KV cache of ``n_ctx`` positions (types ``cache_types``), evaluated
    tokens, logits, and the worker thread that serialises them. ``n_batch`` (capped at ``n_ctx``): the largest
    batch one forward pass evaluates; ``n_threads``: numba threads for its passes; ``logits_all``: keep every
    position's logits (``all_logits``), else only the last (``last_logits``)."""

    def __init__(self, model, n_ctx: int, *, n_batch: int, n_threads: int,
                 cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE), logits_all: bool = False,
                 name: str = "model"):
        self.model = model
        self.n_ctx = int(n_ctx)
        self.n_batch = int(min(n_batch, self.n_ctx))
        self.n_threads = n_threads
        self.cache_types = tuple(cache_types)
        self.logits_all = bool(logits_all)
        self.n_vocab = model.hp.n_vocab
        self.cache = model.new_cache(self.n_ctx, *self.cache_types)
        self.input_ids = np.zeros(self.n_ctx, dtype=np.int64)
        # how each position's keys/values were computed (INT_NUMERICS, BATCH_NUMERICS or NO_FRESH_NUMERICS)
        self.numerics = np.zeros(self.n_ctx, dtype=np.int8)
        self.n_tokens = 0
        self.last_logits: np.ndarray | None = None
        self.all_logits = np.zeros((self.n_ctx, self.n_vocab), np.float32) if self.logits_all else None
        # no lock: a lock held across a stream's yields deadlocks when another thread advances or closes it
        self.scheduler = Scheduler(self._save_state, self._load_state, name=os.path.basename(str(name)))
        self.closed = False

    # --- running on the worker ----------------------------------------------------------------------------
    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the session's worker thread, alone with its state; its result."""
        return self.scheduler.call(fn, *args, **kwargs)

    def open(self, work, on_end=None):
        """A request whose steps (``work``, a generator) run on the worker one per item asked for; see
        ``scheduler.Scheduler.open``."""
        return self.scheduler.open(work, on_end=on_end)

    def close(self) -> None:
        """End every open stream and free the KV cache and logits; the session is unusable afterwards."""
        if self.closed:
            return
        self.closed = True
        self.scheduler.cancel_all()
        self.cache = None
        self.all_logits = None
        self.last_logits = None

    # --- state --------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> np.ndarray:
        """The evaluated tokens (a view)."""
        return self.input_ids[:self.n_tokens]

    def logits_at(self, end: int) -> np.ndarray:
        """The logits after the first ``end`` evaluated tokens (``end`` = n_tokens: the last ones)."""
        if end == self.n_tokens:
            return self.last_logits
        if self.all_logits is not None:
            return self.all_logits[end - 1]
        raise ValueError("logits before the last position need logits_all (Llama(logits_all=True))")

    def reset(self) -> None:
        self.call(self._reset)

    def _reset(self) -> None:
        self.n_tokens = 0
        self.cache.n_past = 0
        self.last_logits = None

    def eval(self, tokens: list[int]) -> None:
        """Evaluate ``tokens`` (ints in the vocabulary) after those already in the KV cache, n_batch at a time."""
        if tokens:
            self.call(self._eval, tokens)

    def _eval(self, tokens: list[int], every_row: bool = False) -> np.ndarray | None:
        """Evaluate ``tokens``; with ``every_row`` their logits [len(tokens), n_vocab] (speculative decoding's
        verification), else None."""
        if self.n_tokens + len(tokens) > self.n_ctx:
            raise ValueError(f"{self.n_tokens} evaluated + {len(tokens)} new tokens exceed the context size "
                             f"n_ctx={self.n_ctx}")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")
        set_threads(self.n_threads)
        rows = []
        for first, last in eval_batches(0, len(tokens), self.n_batch):
            batch = tokens[first:last]
            logits = self.model.forward(batch, self.cache, all_logits=self.logits_all or every_row)
            if every_row:
                rows.append(logits)
            start = self.n_tokens
            self.input_ids[start:start + len(batch)] = batch
            self.numerics[start:start + len(batch)] = BATCH_NUMERICS if runs_alone(len(batch)) else INT_NUMERICS
            self.n_tokens += len(batch)
            if self.all_logits is not None:
                self.all_logits[start:start + len(batch)] = logits
            self.last_logits = logits[-1]
        return np.concatenate(rows) if every_row else None

    def eval_every_row(self, tokens: list[int]) -> np.ndarray:
        """``eval`` that returns the logits after each of ``tokens`` [len(tokens), n_vocab] (whatever
        ``logits_all`` says; on the worker). Up to MAX_EVERY_ROW tokens they are, row by row, the logits
        evaluating the tokens one at a time gives (see ``runs_alone``)."""
        if len(tokens) > MAX_EVERY_ROW:
            raise ValueError(f"eval_every_row takes at most {MAX_EVERY_ROW} tokens, got {len(tokens)}")
        return self.call(self._eval, tokens, True)

    def rewind(self, n: int, logits: np.ndarray) -> None:
        """Keep the first ``n`` evaluated tokens, ``logits`` being the logits after them (a row ``eval_every_row``
        returned): the state evaluating just those tokens leaves (speculative decoding cutting back drafted
        tokens that were not accepted)."""
        self.call(self._rewind, n, logits)

    def _rewind(self, n: int, logits: np.ndarray) -> None:
        self._truncate(n)
        self.last_logits = logits

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` evaluated tokens (and their keys/values); the logits after them are kept only as
        ``all_logits`` rows, so evaluate at least one token before sampling again."""
        self.call(self._truncate, n)

    def _truncate(self, n: int) -> None:
        if not 0 <= n <= self.n_tokens:
            raise ValueError(f"cannot keep {n} of {self.n_tokens} evaluated tokens")
        self.n_tokens = n
        self.cache.truncate(n)
        if self.all_logits is not None:
            self.all_logits[n:] = 0

    def reusable_prefix(self, prompt_tokens) -> int:
        """How many leading tokens of ``prompt_tokens`` may be taken from the KV cache instead of evaluated again.

        Reuse must not change the numbers: a prompt evaluated fresh gets the batch (BLAS) numerics in batches of
        at least BLAS_MIN_TOKENS tokens and the integer-kernel numerics otherwise, and the two differ in float
        summation order. The integer kernels give every token the same numbers whatever batch it is in, so a
        prompt short enough for them reuses every cached position they computed (a chat's system prompt, the
        turns so far); a longer prompt reuses only positions computed by a batch, and its re-evaluated tail keeps
        enough tokens for the batch path. At least the last token is evaluated again (its logits are needed).
        A fixed seed then gives the same text whether or not the cache was warm."""
        n_prompt = len(prompt_tokens)
        cached = self.input_ids[:self.n_tokens]
        limit = min(len(cached), n_prompt - 1)
        want_batch = runs_alone(n_prompt)
        fresh = BATCH_NUMERICS if want_batch else INT_NUMERICS
        n_reuse = 0
        while n_reuse < limit and cached[n_reuse] == prompt_tokens[n_reuse] and self.numerics[n_reuse] == fresh:
            n_reuse += 1
        if want_batch:
            n_reuse = min(n_reuse, n_prompt - BLAS_MIN_TOKENS)
        return max(0, n_reuse)

    def reuse_prefix(self, prompt_tokens) -> int:
        """Truncate to the ``reusable_prefix`` of ``prompt_tokens``; its length (the caller evaluates the rest)."""
        return self.call(self._reuse_prefix, prompt_tokens)

    def _reuse_prefix(self, prompt_tokens) -> int:
        n_reuse = self.reusable_prefix(prompt_tokens)
        self._truncate(min(n_reuse, self.n_tokens))
        return n_reuse

    def context_shift(self, n_keep: int) -> None:
        """llama.cpp's context shift: keep the first n_keep tokens, drop half of the rest, slide the remainder
        (their keys re-rotated to their new positions)."""
        self.call(self._context_shift, n_keep)

    def _context_shift(self, n_keep: int) -> None:
        n_keep = max(0, min(n_keep, self.n_tokens - 1))
        n_discard = (self.n_tokens - n_keep) // 2
        if n_discard <= 0:
            raise ValueError(f"the context (n_ctx={self.n_ctx}) is full and n_keep={n_keep} leaves nothing to drop")
        old_n = self.n_tokens
        self.cache.shift(n_keep, n_discard)
        self.model.rerotate_keys(self.cache, n_keep, self.cache.n_past, -n_discard)
        self.input_ids[n_keep:old_n - n_discard] = self.input_ids[n_keep + n_discard:old_n].copy()
        self.numerics[n_keep:old_n] = NO_FRESH_NUMERICS   # re-rotated keys: no fresh run gives these numbers
        self.n_tokens = old_n - n_discard
        if self.all_logits is not None:
            self.all_logits[n_keep:old_n - n_discard] = self.all_logits[n_keep + n_discard:old_n].copy()
            self.all_logits[self.n_tokens:old_n] = 0

    def save_state(self) -> SessionState:
        return self.call(self._save_state)

    def _save_state(self) -> SessionState:
        n = self.n_tokens
        return SessionState(
            input_ids=self.input_ids[:n].copy(), numerics=self.numerics[:n].copy(), kv=self.cache.snapshot(),
            last_logits=None if self.last_logits is None else self.last_logits.copy(),
            all_logits=None if self.all_logits is None else self.all_logits[:n].copy())

    def load_state(self, state: SessionState) -> None:
        self.call(self._load_state, state)

    def _load_state(self, state: SessionState) -> None:
        n = len(state.input_ids)
        if n > self.n_ctx:
            raise ValueError(f"state of {n} tokens does not fit n_ctx={self.n_ctx}")
        self.cache.restore(state.kv)
        self.input_ids[:n] = state.input_ids
        self.numerics[:n] = state.numerics
        self.n_tokens = n
        self.last_logits = None if state.last_logits is None else state.last_logits.copy()
        if self.all_logits is not None and state.all_logits is not None:
            self.all_logits[:n] = state.all_logits
            self.all_logits[n:] = 0   # rows past the state's tokens belong to no evaluation of it

    def leave_combined_passes(self) -> None:
        """Combined forward passes (``Model.batcher``) stop waiting for this context (a generation ended)."""
        if self.model.batcher is not None and self.cache is not None:
            self.model.batcher.leave(self.cache)

    # --- many sequences -----------------------------------------------------------------------------------
    def sequence_cache(self, n_ctx: int | None = None, type_k: str | None = None,
                       type_v: str | None = None) -> MultiSequenceCache:
        """A KV cache of many sequences on this session's weights (``n_ctx`` positions each, default the
        session's; cache types default to the session's), for the ``ContinuousBatcher``; this session's own
        cache and state are not touched."""
        default_k, default_v = self.cache_types
        return MultiSequenceCache(self.model, self.n_ctx if n_ctx is None else int(n_ctx),
                                  type_k or default_k, type_v or default_v)
