"""Speculative decoding: draft a few tokens cheaply, verify them all in one forward pass, keep the ones the model
itself would have produced.

``Llama(draft_model=LlamaPromptLookupDecoding())`` (llama-cpp-python's API and names). After each sampled token
the draft model proposes the tokens that may follow; the model evaluates the token and the draft in one pass
(logits at every position), and the generation samples each position in turn exactly as plain decoding would,
going on to the next position only while the sampled token is the drafted one. The first difference ends the
verification: the sampled token is kept (it is the next token, as always), the KV cache is cut back to the
accepted tokens, and the next pass evaluates it with a new draft. Every token is sampled from the logits plain
decoding would sample it from, by the same sampler in the same order, so the text is the same, seeded sampling
included, wherever a pass of several tokens gives each the numbers it gets alone (``model/batching.py``'s
``batch_invariant``: every weight matrix on the SIMD kernels, true of every model on x86-64 with AVX2; without
it float weights go through sgemm, whose summation order may break a near tie differently).

Whether it pays depends on the machine: on the CPU a pass of n tokens costs much more than one (a 2-core Zen 4,
Qwen2.5-0.5B: 15-17 ms one token, 24 ms two, 38 ms four, about 75 ms eleven), so a draft that is rejected at once
makes that step several times slower. ``DraftLength`` therefore verifies only as many drafted tokens as are
expected to pay for themselves, from the pass times measured on this model and the acceptance seen so far in the
generation (none while drafts keep failing; they are still followed as shadows, which costs no pass).
"""
from __future__ import annotations

import abc
import threading
from typing import Any

import numpy as np

from .model.session import MAX_EVERY_ROW

#: the most drafted tokens one verification takes: a pass of this many plus one gives every token the numbers it
#: gets alone (a longer one would take the BLAS path and change the logits)
MAX_DRAFT = MAX_EVERY_ROW - 1
#: llama-cpp-python's ``num_pred_tokens`` default, and the command line's ``--draft-max``
DEFAULT_DRAFT_MAX = 10


class LlamaDraftModel(abc.ABC):
    """A draft model: called with the evaluated tokens and the token about to be evaluated (np.intc), it returns
    the tokens it guesses come next (any length; extra ones are not used)."""

    @abc.abstractmethod
    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError


class LlamaPromptLookupDecoding(LlamaDraftModel):
    """Prompt lookup (https://github.com/apoorvumang/prompt-lookup-decoding): the draft is what followed an
    earlier occurrence of the context's last ``max_ngram_size`` tokens (default 2; then shorter n-grams, down to
    one token), at most ``num_pred_tokens`` of it (default 10). Pays where the output repeats its input: code
    edits, quoting, extraction, summaries that reuse phrases."""

    def __init__(self, max_ngram_size: int = 2, num_pred_tokens: int = DEFAULT_DRAFT_MAX):
        for name, value in (("max_ngram_size", max_ngram_size), ("num_pred_tokens", num_pred_tokens)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_ngram_size = int(max_ngram_size)
        self.num_pred_tokens = int(num_pred_tokens)

    @staticmethod
    def find_candidate_pred_tokens(input_ids: np.ndarray, max_ngram_size: int, num_pred_tokens: int) -> np.ndarray:
        """The tokens after the earliest earlier occurrence of the last n tokens of ``input_ids`` that has any
        (n from ``max_ngram_size`` down to 1), at most ``num_pred_tokens`` of them; empty when none has."""
        ids = np.asarray(input_ids)
        length = ids.shape[0]
        for size in range(min(max_ngram_size, length - 1), 0, -1):
            tail = ids[length - size:]
            # windows starting before the tail itself: only those have a continuation
            windows = np.lib.stride_tricks.sliding_window_view(ids[:length - 1], size)
            starts = np.flatnonzero((windows == tail).all(axis=1))
            if starts.size:
                first = int(starts[0]) + size
                return ids[first:min(first + num_pred_tokens, length)]
        return np.array([], dtype=np.intc)

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        return self.find_candidate_pred_tokens(input_ids, self.max_ngram_size, self.num_pred_tokens)


def checked_draft(draft_model, input_ids: np.ndarray, limit: int, n_vocab: int) -> list[int]:
    """The draft model's guess for ``input_ids``, its first ``limit`` tokens as ints; a clear error when it is not
    a one-dimensional sequence of token ids of this vocabulary (the draft model is the caller's code)."""
    draft = draft_model(input_ids)
    try:
        array = np.asarray(draft)
    except Exception as exc:  # noqa: BLE001 - whatever the caller's object raises, say what was expected
        raise TypeError(f"draft_model returned {type(draft).__name__}, not an array of token ids: {exc}") from None
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise TypeError(f"draft_model must return a 1-D array of integer token ids, got shape {array.shape} "
                        f"dtype {array.dtype}")
    tokens = [int(t) for t in array[:limit]]
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"draft_model returned token ids out of range [0, {n_vocab}): {bad[:5]}")
    return tokens


class PassTimes:
    """Seconds a forward pass of n tokens of one sequence takes on this model, as measured (a moving average per
    n), shared by a ``Llama`` and its contexts; passes not measured yet are estimated from those that were."""

    #: a pass of n tokens against one token, before any pass of several was measured (a 2-core Zen 4 with AVX-512
    #: and a 2-core Zen 3 with AVX2, Qwen2.5-0.5B: 1.7 and 2.5 at 2 and 4 tokens)
    PRIOR_GROWTH = 0.5
    WEIGHT = 0.3     # of a new measurement in the moving average

    def __init__(self):
        self._seconds: dict[int, float] = {}
        self._warmed: set[int] = set()
        self._lock = threading.Lock()   # contexts of one model measure from their own worker threads

    def record(self, n_tokens: int, seconds: float) -> None:
        with self._lock:
            if n_tokens not in self._warmed:
                # the first pass of a size is not counted: it may have compiled or loaded its kernels (28 s for
                # two tokens after numba's cache was dropped, which would have ruled drafting out for good)
                self._warmed.add(n_tokens)
                return
            old = self._seconds.get(n_tokens)
            if old is None:
                self._seconds[n_tokens] = seconds
            else:   # a pass slowed by something else (a page fault storm, another process) moves it a little
                self._seconds[n_tokens] = old + self.WEIGHT * (min(seconds, 3 * old) - old)

    def estimates(self, most: int) -> list[float]:
        """The expected seconds of a pass of n tokens for n = 1 .. most (index n - 1), in units of a one-token
        pass when nothing is known."""
        with self._lock:
            known = dict(self._seconds)
        return [self._estimate(known, n) for n in range(1, most + 1)]

    def _estimate(self, known: dict[int, float], n_tokens: int) -> float:
        if n_tokens in known:
            return known[n_tokens]
        one = known.get(1, 1.0)
        several = sorted(n for n in known if n > 1)
        below = [n for n in several if n < n_tokens]
        above = [n for n in several if n > n_tokens]
        if below and above:   # between two measured sizes: on the line through them
            lo, hi = below[-1], above[0]
            return known[lo] + (known[hi] - known[lo]) * (n_tokens - lo) / (hi - lo)
        if below:             # past the largest one measured: its cost per token beyond the first
            lo = below[-1]
            return known[lo] * (1 + self.PRIOR_GROWTH * (n_tokens - 1)) / (1 + self.PRIOR_GROWTH * (lo - 1))
        if above:
            hi = above[0]
            return one + (known[hi] - one) * (n_tokens - 1) / (hi - 1)
        return one * (1 + self.PRIOR_GROWTH * (n_tokens - 1))


class DraftLength:
    """How many drafted tokens one generation verifies at its next step: the k that maximises the tokens a pass
    is expected to yield, 1 + p + ... + p^k (each drafted token accepted with probability p while the ones
    before it were), per second of a pass of k + 1 tokens. p is this generation's acceptance so far, a decaying
    count of accepted and rejected drafted tokens starting from a neutral prior.

    While no k > 0 pays, a draft is still taken whenever none is being followed, and followed as a shadow: each
    token sampled after it is compared with the drafted one at its place, until one differs or the draft runs out, and the run counts as
    a verification would (no pass is spent on it). So the acceptance is measured at every depth, not only at the
    first drafted token (code's first drafted token after a newline is often right, the next ones rarely), and a
    generation whose text starts repeating (a quoted block, a code edit) starts drafting within a few tokens."""

    PRIOR = (1.0, 1.0)   # accepted, rejected
    DECAY = 0.8          # per update: after a run of long accepted drafts, about 8 rejected ones rule drafting out
    SHADOW_LENGTH = 4    # tokens of a shadow draft followed: long enough to see past the first, short enough that
                         # a right one is known in a few steps (a longer run is extrapolated: p per position)

    def __init__(self, times: PassTimes):
        self.times = times
        self.accepted, self.rejected = self.PRIOR
        self.shadow: list[int] = []   # a draft being followed, and how many of its tokens were sampled so far
        self.shadow_matched = 0

    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def limit(self, most: int) -> int:
        """The number of drafted tokens worth verifying at this step, at most ``most``."""
        p = self.acceptance()
        seconds = self.times.estimates(most + 1)
        best_k, best_rate = 0, 1.0 / seconds[0]
        expected = 1.0
        for k in range(1, most + 1):
            expected += p ** k
            rate = expected / seconds[k]
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k > 0:
            self.shadow = []   # a real verification measures the acceptance from now on
        return best_k

    def wants_shadow(self) -> bool:
        """Whether a draft should be taken to follow (none is being followed)."""
        return not self.shadow

    def follow(self, draft: list[int]) -> None:
        """Follow ``draft`` (of the tokens after the one being evaluated) as a shadow."""
        self.shadow, self.shadow_matched = list(draft[:self.SHADOW_LENGTH]), 0

    def observe(self, token: int) -> None:
        """The token sampled at this step (no draft verified): compared with the shadow draft's, if one is
        followed."""
        if not self.shadow:
            return
        if token == self.shadow[self.shadow_matched]:
            self.shadow_matched += 1
            if self.shadow_matched < len(self.shadow):
                return
        self.update(len(self.shadow), self.shadow_matched)
        self.shadow = []

    def update(self, drafted: int, accepted: int) -> None:
        """After a verification (or a shadow draft) of ``drafted`` tokens of which the first ``accepted`` were
        the model's own (a verification cut short by the end of the generation counts only the positions it
        sampled)."""
        if drafted <= 0:
            return
        self.accepted = self.DECAY * self.accepted + accepted
        self.rejected = self.DECAY * self.rejected + (1 if accepted < drafted else 0)
