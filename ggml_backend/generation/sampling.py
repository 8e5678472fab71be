"""Choosing the next token from a row of logits, the way llama.cpp does.

The chain (llama.cpp's classic order, as in ``common/sampling`` and llama-cpp-python's ``Llama.sample``):

    logit bias -> repetition / frequency / presence penalties over the last ``repeat_last_n`` tokens
    -> temperature <= 0: greedy argmax
    -> mirostat 1 or 2: temperature, then mirostat (which draws the token itself)
    -> otherwise: top-k -> tail-free (tfs_z) -> locally typical -> top-p -> min-p -> temperature -> draw

Every stage is also a standalone function on a ``Candidates`` (token ids + logits, optionally sorted by logit,
descending) so each one can be checked on its own. The algorithms follow ``src/llama-sampling.cpp``; the random
numbers do not: llama.cpp draws from ``std::mt19937``, we draw from numpy's ``PCG64`` seeded with the request's seed,
so a fixed seed gives the same tokens on every run and machine (but not the same tokens as llama.cpp).

Logits stay float32 as in llama.cpp; probabilities are computed in float64 (softmax with the maximum subtracted),
which only matters for values that sit exactly on a threshold.
"""
from __future__ import annotations

import math
import numbers
import re
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

# llama-cpp-python uses m = 100 for mirostat v1 (the number of top tokens used to estimate the Zipf exponent).
MIROSTAT_V1_M = 100


class SamplingError(ValueError):
    """Invalid sampling parameters or inputs (bad logits shape, token ids out of range, ...)."""


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------

def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise SamplingError(f"{name} must not be NaN")
    return value


def _finite(name: str, value) -> float:
    value = _real(name, value)
    if math.isinf(value):
        raise SamplingError(f"{name} must be finite, got {value}")
    return value


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _in_unit_interval(name: str, value) -> float:
    value = _finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise SamplingError(f"{name} must be in [0, 1], got {value}")
    return value


#: llama.cpp's "pick a random seed" value (``LLAMA_DEFAULT_SEED``, llama-cpp-python's default ``seed``): -1 as a
#: uint32, which is why both mean "random"
LLAMA_DEFAULT_SEED = 0xFFFFFFFF


def seed_is_random(seed) -> bool:
    """Whether ``seed`` asks for a random seed: None, -1 or ``LLAMA_DEFAULT_SEED`` (the one rule every layer
    uses: SamplingParams, Sampler, the API's seed chain, the CLI, the servers)."""
    return seed is None or seed == -1 or seed == LLAMA_DEFAULT_SEED


def normalize_seed(seed, name: str = "seed") -> int | None:
    """A seed as the engine keeps it: None for "random" (see ``seed_is_random``), else an int >= 0; a
    SamplingError for anything else."""
    if seed is None:
        return None
    seed = _int(name, seed)
    if seed < -1:
        raise SamplingError(f"{name} must be >= 0, or -1/None for a random seed, got {seed}")
    return None if seed_is_random(seed) else seed


def derived_seed(base: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request whose choice 0 has seed ``base`` (OpenAI's ``n``): base + index,
    kept below LLAMA_DEFAULT_SEED so that a derived seed never means "random"; None (random) when base is."""
    return None if base is None else (base + index) % LLAMA_DEFAULT_SEED


def next_chain_seed(seed: int) -> int:
    """The next seed of a seed chain (llama-cpp-python's per-``Llama`` seeding: the constructor's seed draws each
    call's seed in turn, so repeated calls differ and a run of them reproduces); never a "random" value."""
    import random
    return random.Random(seed).randint(0, LLAMA_DEFAULT_SEED - 1)


def normalize_logit_bias(logit_bias) -> dict[int, float]:
    """``{token_id: bias}`` with int ids (OpenAI JSON sends them as strings) and a bias that is finite or -inf."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, Mapping):
        raise SamplingError(f"logit_bias must be a mapping of token id to bias, got {type(logit_bias).__name__}")
    normalized: dict[int, float] = {}
    for key, bias in logit_bias.items():
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            token = int(key)
        elif isinstance(key, str) and re.fullmatch(r"\s*-?\d+\s*", key):
            token = int(key)
        else:
            raise SamplingError(f"logit_bias key {key!r} is not a token id")
        if token < 0:
            raise SamplingError(f"logit_bias token id {token} is negative")
        bias = _real(f"logit_bias[{token}]", bias)
        if bias == math.inf:
            raise SamplingError(f"logit_bias[{token}] is +inf; use a large finite value to force a token")
        normalized[token] = bias
    return normalized


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings with llama.cpp's defaults.

    Disabled values, as in llama.cpp: ``top_k <= 0`` (0 or -1), ``top_p >= 1``, ``min_p <= 0``, ``tfs_z >= 1``,
    ``typical_p >= 1``, ``repeat_penalty == 1``, ``repeat_last_n == 0`` (``-1`` means the whole history),
    ``mirostat_mode == 0``. ``temperature <= 0`` means greedy. ``seed`` None, -1 or ``LLAMA_DEFAULT_SEED`` picks a
    random seed, and is kept as None (``normalize_seed``).
    ``repeat_penalty`` defaults to 1.1 (llama.cpp ``main``'s historical default; llama-cpp-python >= 0.2.x
    defaults ``create_completion`` to 1.0, so the API layer should pass 1.0 to match it).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    tfs_z: float = 1.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: dict = field(default_factory=dict)
    seed: int | None = None
    penalize_nl: bool = True
    top_a: float = 0.0                 # KoboldCpp's Top-A: keeps p >= top_a * p_max^2; 0 disables it
    repeat_penalty_slope: float = 1.0  # KoboldCpp's rep_pen_slope: the older half of the window gets
                                       # 1 + (repeat_penalty - 1) * slope; 1 (or a penalty <= 1) disables it

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("temperature", _finite("temperature", self.temperature))
        top_k = _int("top_k", self.top_k)
        if top_k < -1:
            raise SamplingError(f"top_k must be >= 0 (0 or -1 disable it), got {top_k}")
        set_("top_k", top_k)
        for name in ("top_p", "min_p", "tfs_z", "typical_p"):
            set_(name, _in_unit_interval(name, getattr(self, name)))
        repeat_penalty = _finite("repeat_penalty", self.repeat_penalty)
        if repeat_penalty <= 0.0:
            raise SamplingError(f"repeat_penalty must be > 0 (1.0 disables it), got {repeat_penalty}")
        set_("repeat_penalty", repeat_penalty)
        repeat_last_n = _int("repeat_last_n", self.repeat_last_n)
        if repeat_last_n < -1:
            raise SamplingError(f"repeat_last_n must be >= 0, or -1 for the whole history, got {repeat_last_n}")
        set_("repeat_last_n", repeat_last_n)
        set_("frequency_penalty", _finite("frequency_penalty", self.frequency_penalty))
        set_("presence_penalty", _finite("presence_penalty", self.presence_penalty))
        mirostat_mode = _int("mirostat_mode", self.mirostat_mode)
        if mirostat_mode not in (0, 1, 2):
            raise SamplingError(f"mirostat_mode must be 0 (off), 1 or 2, got {mirostat_mode}")
        set_("mirostat_mode", mirostat_mode)
        tau = _finite("mirostat_tau", self.mirostat_tau)
        if tau <= 0.0:
            raise SamplingError(f"mirostat_tau must be > 0, got {tau}")
        set_("mirostat_tau", tau)
        eta = _finite("mirostat_eta", self.mirostat_eta)
        if eta < 0.0:
            raise SamplingError(f"mirostat_eta must be >= 0, got {eta}")
        set_("mirostat_eta", eta)
        set_("logit_bias", normalize_logit_bias(self.logit_bias))
        set_("seed", normalize_seed(self.seed))
        top_a = _finite("top_a", self.top_a)
        if top_a < 0.0:
            raise SamplingError(f"top_a must be >= 0 (0 disables it), got {top_a}")
        set_("top_a", top_a)
        slope = _finite("repeat_penalty_slope", self.repeat_penalty_slope)
        if not 0.0 <= slope <= 1.0:
            raise SamplingError(f"repeat_penalty_slope must be from 0 to 1 (1 disables it), got {slope}")
        set_("repeat_penalty_slope", slope)
        if not isinstance(self.penalize_nl, (bool, np.bool_)):
            raise SamplingError(f"penalize_nl must be a bool, got {self.penalize_nl!r}")
        set_("penalize_nl", bool(self.penalize_nl))


# --------------------------------------------------------------------------------------------------------------
# Candidates and the standalone stages
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidates:
    """Token ids with their (float32) logits; ``is_sorted`` says they are in descending logit order."""

    ids: np.ndarray
    logits: np.ndarray
    is_sorted: bool = False

    @classmethod
    def from_logits(cls, logits) -> "Candidates":
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise SamplingError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        return cls(np.arange(logits.size, dtype=np.int32), logits.copy(), False)

    def __len__(self) -> int:
        return int(self.ids.size)

    def probs(self) -> np.ndarray:
        """Softmax of the logits (float64), in the candidates' order."""
        return _softmax(self.logits)

    def sorted(self) -> "Candidates":
        """Descending by logit; equal logits keep ascending id order, so the result never depends on the input
        order or on the sort algorithm."""
        if self.is_sorted:
            return self
        order = np.lexsort((self.ids, -self.logits))
        return Candidates(self.ids[order], self.logits[order], True)

    def head(self, n: int) -> "Candidates":
        return Candidates(self.ids[:n], self.logits[:n], self.is_sorted)


_ALL_BANNED = "every token has logit -inf (all tokens banned): nothing can be sampled"


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max()
    if not np.isfinite(top):
        raise SamplingError("every candidate has logit -inf (all tokens banned): nothing can be sampled")
    weights = np.exp(logits - top)
    return weights / weights.sum()


def softmax(candidates: Candidates) -> tuple[Candidates, np.ndarray]:
    """Sorts the candidates and returns them with their probabilities (llama.cpp's ``softmax`` sampler)."""
    candidates = candidates.sorted()
    return candidates, candidates.probs()


def apply_logit_bias(candidates: Candidates, logit_bias: Mapping[int, float], *, in_place: bool = False
                     ) -> Candidates:
    """Adds ``logit_bias[id]`` to the logit of each listed id present among the candidates. ``in_place``: into
    ``candidates.logits`` itself (the caller owns it), not a copy."""
    if not logit_bias:
        return candidates
    bias_ids = np.fromiter(logit_bias.keys(), dtype=np.int64, count=len(logit_bias))
    bias_values = np.fromiter(logit_bias.values(), dtype=np.float64, count=len(logit_bias))
    logits = candidates.logits if in_place else candidates.logits.copy()
    positions, which = _positions_of(candidates.ids, bias_ids)
    logits[positions] = (logits[positions] + bias_values[which]).astype(np.float32)
    return Candidates(candidates.ids, logits, False)


def _positions_of(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``ids`` holding a value of ``wanted`` (unique), and the index in ``wanted`` of each.

    Candidate ids are unique, so where ``ids[w] == w`` for every wanted id (the full vocabulary in id order, as the
    penalties and the logit bias see it) the answer is ``wanted`` itself: no search over 150k ids per token."""
    if wanted.size and 0 <= wanted.min() and wanted.max() < ids.size and np.array_equal(ids[wanted], wanted):
        return wanted, np.arange(wanted.size)
    if ids.size <= 64:   # a few candidates (``Sampler._greedy``'s touched ids): a dict, not sorts and searches
        where = {token: i for i, token in enumerate(wanted.tolist())}
        pairs = [(position, where[token]) for position, token in enumerate(ids.tolist()) if token in where]
        positions = np.array([position for position, _ in pairs], np.int64)
        return positions, np.array([i for _, i in pairs], np.int64)
    order = np.argsort(wanted, kind="stable")
    wanted_sorted = wanted[order]
    slot = np.searchsorted(wanted_sorted, ids)
    slot_clipped = np.minimum(slot, wanted_sorted.size - 1)
    hit = wanted_sorted[slot_clipped] == ids
    positions = np.nonzero(hit)[0]
    return positions, order[slot_clipped[positions]]


def apply_penalties(candidates: Candidates, penalized_tokens: Sequence[int], repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0, *, in_place: bool = False
                    ) -> Candidates:
    """llama.cpp's penalties over ``penalized_tokens`` (the caller passes the last ``repeat_last_n`` tokens).

    For each candidate seen ``count > 0`` times: a logit <= 0 is multiplied by ``repeat_penalty``, a positive one
    divided by it; then ``logit -= count * frequency_penalty + presence_penalty``. ``in_place``: into
    ``candidates.logits`` itself (the caller owns it), not a copy.
    """
    if len(penalized_tokens) == 0 or (repeat_penalty == 1.0 and frequency_penalty == 0.0
                                      and presence_penalty == 0.0):
        return candidates
    seen, counts = np.unique(np.asarray(penalized_tokens, dtype=np.int64), return_counts=True)
    positions, which = _positions_of(candidates.ids, seen)
    logits = candidates.logits if in_place else candidates.logits.copy()
    penalized = logits[positions]
    penalized = np.where(penalized <= 0, penalized * np.float32(repeat_penalty),
                         penalized / np.float32(repeat_penalty))
    penalized -= (counts[which] * np.float32(frequency_penalty) + np.float32(presence_penalty)).astype(np.float32)
    logits[positions] = penalized.astype(np.float32)
    return Candidates(candidates.ids, logits, False)


def top_k(candidates: Candidates, k: int, min_keep: int = 1) -> Candidates:
    """Keeps the ``k`` highest logits (sorted). ``k <= 0`` disables it."""
    if k <= 0:
        return candidates
    k = min(max(k, min_keep), len(candidates))
    if candidates.is_sorted:
        return candidates.head(k)
    n = len(candidates)
    if k < n:
        # Everything tied with the k-th largest value goes into the sort, so ties resolve by id as in sorted().
        kth_largest = np.partition(candidates.logits, n - k)[n - k]
        keep = candidates.logits >= kth_largest
        candidates = Candidates(candidates.ids[keep], candidates.logits[keep], False)
    return candidates.sorted().head(k)


def tail_free(candidates: Candidates, z: float, min_keep: int = 1) -> Candidates:
    """Tail-free sampling (llama.cpp's, https://www.trentonbricken.com/Tail-Free-Sampling/).

    On the sorted probabilities, the absolute second differences ``|p[i] - 2 p[i+1] + p[i+2]|`` are normalized
    to sum to 1 (uniform if their sum is <= 1e-6); the first index ``i >= min_keep`` whose running sum exceeds
    ``z`` is the number of tokens kept. ``z >= 1`` or at most 2 candidates: unchanged.
    """
    if z >= 1.0 or len(candidates) <= 2:
        return candidates
    candidates, probs = softmax(candidates)
    first = probs[:-1] - probs[1:]
    second = np.abs(first[:-1] - first[1:])
    total = second.sum()
    second = second / total if total > 1e-6 else np.full(second.size, 1.0 / second.size)
    cumulative = np.cumsum(second)
    over = np.nonzero((cumulative > z) & (np.arange(second.size) >= min_keep))[0]
    keep = int(over[0]) if over.size else len(candidates)
    return candidates.head(keep)


def typical(candidates: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Locally typical sampling (https://arxiv.org/abs/2202.00666), as llama.cpp implements it.

    Tokens are ordered by ``|-log p_i - H|`` (H the entropy) and the shortest such prefix whose probability sum
    exceeds ``p`` (and holds at least ``min_keep`` tokens) is kept, in that order (no longer sorted by logit).
    Zero-probability tokens contribute nothing to H (llama.cpp would produce NaN there).
    """
    if p >= 1.0:
        return candidates
    candidates, probs = softmax(candidates)
    with np.errstate(divide="ignore"):
        neg_log = -np.log(probs)
    entropy = float(np.sum(np.where(probs > 0, probs * neg_log, 0.0)))
    shifted = np.abs(neg_log - entropy)
    order = np.argsort(shifted, kind="stable")
    cumulative = np.cumsum(probs[order])
    enough = np.arange(order.size) >= (min_keep - 1 if min_keep > 0 else 0)
    over = np.nonzero((cumulative > p) & enough)[0]
    keep = int(over[0]) + 1 if over.size else order.size
    order = order[:keep]
    return Candidates(candidates.ids[order], candidates.logits[order], False)


def top_p(candidates: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Nucleus sampling: the shortest sorted prefix whose probability sum is >= ``p`` (at least ``min_keep``)."""
    if p >= 1.0:
        return candidates
    candidates, probs = softmax(candidates)
    cumulative = np.cumsum(probs)
    over = np.nonzero((cumulative >= p) & (np.arange(1, probs.size + 1) >= min_keep))[0]
    keep = int(over[0]) + 1 if over.size else len(candidates)
    return candidates.head(keep)


def min_p(candidates: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Keeps tokens with ``p_i >= p * p_max``, i.e. ``logit_i >= max_logit + log(p)`` (at least ``min_keep``)."""
    if p <= 0.0 or len(candidates) == 0:
        return candidates
    min_logit = np.float32(candidates.logits.max()) + np.float32(math.log(p))
    keep = candidates.logits >= min_logit
    if int(keep.sum()) >= min_keep:
        return Candidates(candidates.ids[keep], candidates.logits[keep], False).sorted()
    return candidates.sorted().head(min(min_keep, len(candidates)))


def top_a(candidates: Candidates, a: float, min_keep: int = 1) -> Candidates:
    """KoboldCpp's Top-A: keeps tokens with ``p_i >= a * p_max**2`` (probabilities of the candidates), i.e.
    ``logit_i >= max_logit + log(a * p_max)``; the more sure the model, the more it cuts. ``a <= 0`` disables it."""
    if a <= 0.0 or len(candidates) == 0:
        return candidates
    logits = candidates.logits.astype(np.float64)
    p_max = 1.0 / np.exp(logits - logits.max()).sum()
    keep = logits >= logits.max() + math.log(a * p_max)
    if int(keep.sum()) >= min_keep:
        return Candidates(candidates.ids[keep], candidates.logits[keep], False).sorted()
    return candidates.sorted().head(min(min_keep, len(candidates)))


def temperature(candidates: Candidates, temp: float) -> Candidates:
    """Divides the logits by ``temp``; ``temp <= 0`` keeps only the highest logit (greedy)."""
    if temp <= 0.0:
        best = int(np.argmax(candidates.logits))  # the first maximum, as llama.cpp's loop keeps
        return Candidates(candidates.ids[best:best + 1], candidates.logits[best:best + 1], True)
    return Candidates(candidates.ids, (candidates.logits / np.float32(temp)).astype(np.float32),
                      candidates.is_sorted)


def draw(candidates: Candidates, rng: np.random.Generator) -> int:
    """Draws one token id from the softmax of the candidates (llama.cpp's ``dist``: one uniform double ``u``,
    the first candidate whose running probability sum exceeds ``u``)."""
    probs = candidates.probs()
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates.ids[min(index, len(candidates) - 1)])


def mirostat_v1_k(candidates: Candidates, mu: float, n_vocab: int, m: int = MIROSTAT_V1_M) -> int:
    """Mirostat v1's top-k size: estimates the Zipf exponent ``s_hat`` from the ``m`` most probable tokens, then
    ``k = (eps * 2**mu / (1 - n_vocab**-eps)) ** (1 / s_hat)`` with ``eps = s_hat - 1``, at least 1.

    ``log(p_i / p_(i+1))`` is computed as the logit difference, which needs only the top ``m`` tokens sorted.
    """
    best = top_k(candidates, m)
    count = min(m - 1, len(best) - 1)
    if count <= 0:
        return 1
    ranks = np.arange(count, dtype=np.float64)
    t = np.log((ranks + 2) / (ranks + 1))
    logits = best.logits.astype(np.float64)
    b = logits[:count] - logits[1:count + 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s_hat = float(np.sum(t * b) / np.sum(t * t))
        epsilon = s_hat - 1.0
        # np.exp2, not 2.0 ** mu: a huge mu (a large learning rate or target) gives inf, not OverflowError
        k = (epsilon * np.exp2(np.float64(mu)) / (1.0 - np.float64(n_vocab) ** -epsilon)) ** (1.0 / s_hat)
    if not np.isfinite(k):
        # Degenerate estimates (a flat or one-hot distribution): keep every candidate rather than crash.
        return len(candidates)
    return max(int(k), 1)


def mirostat_v1(candidates: Candidates, mu: float, tau: float, eta: float, n_vocab: int,
                rng: np.random.Generator, m: int = MIROSTAT_V1_M) -> tuple[int, float]:
    """One mirostat v1 step: top-k with k from ``mirostat_v1_k``, draw, then ``mu -= eta * (surprise - tau)``
    where ``surprise = -log2(p)`` of the drawn token among the kept ones. Returns (token, new mu)."""
    k = mirostat_v1_k(candidates, mu, n_vocab, m)
    kept, probs = softmax(top_k(candidates, k))
    token = draw(kept, rng)
    surprise = -math.log2(float(probs[int(np.nonzero(kept.ids == token)[0][0])]))
    return token, mu - eta * (surprise - tau)


def mirostat_v2_truncate(candidates: Candidates, mu: float) -> Candidates:
    """Mirostat v2's truncation: the sorted prefix of tokens whose surprise ``-log2(p)`` is <= ``mu`` (at least 1).

    Surprise grows as probability falls, so the prefix is exactly the set with surprise <= mu: it is selected
    before sorting, and only the kept tokens are sorted.
    """
    probs = candidates.probs()
    with np.errstate(divide="ignore"):
        surprise = -np.log2(probs)
    keep = surprise <= mu
    if not keep.any():
        return top_k(candidates, 1)
    return Candidates(candidates.ids[keep], candidates.logits[keep], False).sorted()


def mirostat_v2(candidates: Candidates, mu: float, tau: float, eta: float,
                rng: np.random.Generator) -> tuple[int, float]:
    """One mirostat v2 step: truncate by surprise, draw, ``mu -= eta * (surprise - tau)``. Returns (token, new mu)."""
    kept, probs = softmax(mirostat_v2_truncate(candidates, mu))
    token = draw(kept, rng)
    surprise = -math.log2(float(probs[int(np.nonzero(kept.ids == token)[0][0])]))
    return token, mu - eta * (surprise - tau)


# --------------------------------------------------------------------------------------------------------------
# Log-probabilities (OpenAI-style ``logprobs``)
# --------------------------------------------------------------------------------------------------------------

def log_softmax(logits) -> np.ndarray:
    """Log-softmax of raw logits (before any sampling stage), float32, as llama-cpp-python's logprobs use."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise SamplingError(f"logits must be a non-empty 1-D array, got shape {values.shape}")
    top = values.max()
    if not np.isfinite(top):
        raise SamplingError("logits have no finite maximum")
    shifted = values - top
    return (shifted - np.log(np.sum(np.exp(shifted)))).astype(np.float32)


def top_logprobs(logits, n: int) -> list[tuple[int, float]]:
    """The ``n`` most likely tokens of the raw logits as ``(token_id, logprob)``, most likely first (ties: lower
    id first)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise SamplingError(f"the number of logprobs must be a non-negative integer, got {n!r}")
    logprobs = log_softmax(logits)
    best = top_k(Candidates(np.arange(logprobs.size, dtype=np.int32), logprobs), int(n)) if n > 0 else None
    if best is None:
        return []
    return [(int(token), float(value)) for token, value in zip(best.ids, best.logits)]


# --------------------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------------------

class Sampler:
    """Applies the whole chain for one generation; holds the RNG and the mirostat state.

    ``seed`` (when given) overrides ``params.seed``; a random one (``seed_is_random``) draws a fresh seed, kept in ``self.seed``
    so a run can be repeated. ``newline_token`` is needed only for ``penalize_nl=False`` (its logit is restored
    after the penalties, as llama.cpp did).
    """

    def __init__(self, params: SamplingParams | None = None, n_vocab: int = 0, seed: int | None = None,
                 newline_token: int | None = None):
        self.params = params if params is not None else SamplingParams()
        if not isinstance(self.params, SamplingParams):
            raise SamplingError(f"params must be SamplingParams, got {type(self.params).__name__}")
        self.n_vocab = _int("n_vocab", n_vocab)
        if self.n_vocab <= 0:
            raise SamplingError(f"n_vocab must be positive, got {n_vocab}")
        for token in self.params.logit_bias:
            if token >= self.n_vocab:
                raise SamplingError(f"logit_bias token id {token} is out of range for a vocabulary of {n_vocab}")
        if newline_token is not None:
            newline_token = _int("newline_token", newline_token)
            if not 0 <= newline_token < self.n_vocab:
                raise SamplingError(f"newline_token {newline_token} is out of range for a vocabulary of {n_vocab}")
        self.newline_token = newline_token
        # the vocabulary's ids, and the logits' working copy of ``sample``: made once, not per token. Fresh
        # 600 KB arrays each token cost ~500 page faults a call in a server's threads (1.9 ms against 0.15)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._ids.setflags(write=False)
        self._work = np.empty(self.n_vocab, np.float32)
        requested = self.params.seed if seed is None else normalize_seed(seed)
        self.seed = secrets.randbits(32) if requested is None else requested
        self.reset()

    def reset(self) -> None:
        """Restarts the random sequence from the seed and mirostat's mu from 2 * tau."""
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.mirostat_mu = 2.0 * self.params.mirostat_tau

    def _checked_logits(self, logits, out: np.ndarray | None = None) -> np.ndarray:
        """A float32 copy of ``logits`` (into ``out`` if given), checked."""
        values = np.asarray(logits)
        if values.ndim != 1 or values.shape[0] != self.n_vocab:
            raise SamplingError(f"logits must have shape ({self.n_vocab},), got {values.shape}")
        if out is None:
            out = np.empty(self.n_vocab, np.float32)
        np.copyto(out, values, casting="unsafe")
        if not out.max() < np.inf:   # the max is NaN if any value is, +inf if any value is
            raise SamplingError("logits contain NaN or +inf")
        return out

    def _penalized_window(self, recent_tokens: Iterable[int]) -> np.ndarray:
        tokens = np.asarray(list(recent_tokens) if not isinstance(recent_tokens, np.ndarray) else recent_tokens,
                            dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.n_vocab):
            raise SamplingError(f"recent token ids must be in [0, {self.n_vocab})")
        last_n = self.params.repeat_last_n
        if last_n == 0:
            return tokens[:0]
        return tokens if last_n == -1 else tokens[-last_n:]

    def candidates(self, logits, recent_tokens: Iterable[int] = ()) -> Candidates:
        """The full vocabulary after logit bias and penalties (the stages every mode shares), in a fresh logits
        array; its ids are read-only."""
        return self._candidates(logits, recent_tokens, None)

    def _candidates(self, logits, recent_tokens: Iterable[int], out: np.ndarray | None) -> Candidates:
        """``candidates``, its logits in ``out`` when given (``sample``'s working copy)."""
        candidates = Candidates(self._ids, self._checked_logits(logits, out))
        candidates = self._adjusted(candidates, self._penalized_window(recent_tokens))
        if not np.isfinite(candidates.logits.max()):
            raise SamplingError(_ALL_BANNED)
        return candidates

    def _adjusted(self, candidates: Candidates, window: np.ndarray) -> Candidates:
        """The logit bias and the penalties, in place: on the whole vocabulary, or on any subset of it (``_greedy``
        adjusts only the ids they touch), with the same numbers for each id."""
        p = self.params
        candidates = apply_logit_bias(candidates, p.logit_bias, in_place=True)
        newline_at = None
        if not p.penalize_nl and self.newline_token is not None:
            positions, _ = _positions_of(candidates.ids, np.array([self.newline_token], np.int64))
            if positions.size:
                newline_at = int(positions[0])
                newline_logit = candidates.logits[newline_at]
        if p.repeat_penalty > 1.0 and p.repeat_penalty_slope < 1.0 and len(window) >= 2:
            # KoboldCpp's slope: tokens seen only in the older half of the window get a smaller penalty
            near = np.unique(window[len(window) // 2:])
            far_only = np.setdiff1d(np.unique(window[:len(window) // 2]), near)
            reduced = 1.0 + (p.repeat_penalty - 1.0) * p.repeat_penalty_slope
            candidates = apply_penalties(candidates, near, p.repeat_penalty, in_place=True)
            candidates = apply_penalties(candidates, far_only, reduced, in_place=True)
            candidates = apply_penalties(candidates, window, 1.0, p.frequency_penalty, p.presence_penalty,
                                         in_place=True)
        else:
            candidates = apply_penalties(candidates, window, p.repeat_penalty, p.frequency_penalty,
                                         p.presence_penalty, in_place=True)
        if newline_at is not None:
            candidates.logits[newline_at] = newline_logit
        return candidates

    def _greedy(self, logits, recent_tokens: Iterable[int]) -> int:
        """``sample`` at temperature 0: the argmax of the adjusted logits, the same token and the same errors,
        without adjusting a copy of the whole vocabulary. Only the ids that the logit bias, the penalties (over
        the window) or the newline rule change can differ from the raw logits; their adjusted logits are compared
        with the best untouched one. A server's slots sample one after another between two forward passes, each
        over logits the pass left in memory: the copy, the checks and the argmax (five passes over 600 KB) were a
        quarter of a slot's time there; this is one pass, two where the best raw token is a touched one."""
        if not (isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (self.n_vocab,)):
            return int(np.argmax(self._candidates(logits, recent_tokens, self._work).logits))
        p = self.params
        window = self._penalized_window(recent_tokens)
        best = int(np.argmax(logits))       # NaN counts as the largest value: the first NaN if there is one
        best_value = logits[best]
        if not best_value < np.inf:
            raise SamplingError("logits contain NaN or +inf")
        touched = set(p.logit_bias)
        if p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            touched.update(window.tolist())
            if not p.penalize_nl and self.newline_token is not None:
                touched.add(self.newline_token)
        if touched:
            ids = np.array(sorted(touched), np.int64)
            if best in touched:                       # the best untouched id: the touched ones masked out
                work = self._work
                np.copyto(work, logits)
                work[ids] = -np.inf
                best = int(np.argmax(work))
                best_value = work[best]
            adjusted = self._adjusted(Candidates(ids.astype(np.int32), logits[ids]), window).logits
            if np.isnan(adjusted).any():
                raise SamplingError(_ALL_BANNED)      # as the whole vocabulary's NaN maximum does
            j = int(np.argmax(adjusted))
            if adjusted[j] > best_value or (adjusted[j] == best_value and ids[j] < best):
                best, best_value = int(ids[j]), adjusted[j]
        if not np.isfinite(best_value):
            raise SamplingError(_ALL_BANNED)
        return best

    def sample(self, logits, recent_tokens: Iterable[int] = ()) -> int:
        """The next token id for ``logits`` (float32[n_vocab]) given the tokens so far (prompt + generated)."""
        p = self.params
        if p.temperature <= 0.0:
            return self._greedy(logits, recent_tokens)
        candidates = self._candidates(logits, recent_tokens, self._work)
        if p.mirostat_mode == 1:
            token, self.mirostat_mu = mirostat_v1(temperature(candidates, p.temperature), self.mirostat_mu,
                                                  p.mirostat_tau, p.mirostat_eta, self.n_vocab, self.rng)
            return token
        if p.mirostat_mode == 2:
            token, self.mirostat_mu = mirostat_v2(temperature(candidates, p.temperature), self.mirostat_mu,
                                                  p.mirostat_tau, p.mirostat_eta, self.rng)
            return token
        candidates = top_k(candidates, p.top_k)
        candidates = top_a(candidates, p.top_a)
        candidates = tail_free(candidates, p.tfs_z)
        candidates = typical(candidates, p.typical_p)
        candidates = top_p(candidates, p.top_p)
        candidates = min_p(candidates, p.min_p)
        candidates = temperature(candidates, p.temperature)
        return draw(candidates, self.rng)
