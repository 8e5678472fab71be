"""``LlamaRAMCache`` and ``LlamaDiskCache``: evaluated prompts' states kept in memory or on disk, so prompts that
share a head (the same system prompt, the same tool list) are evaluated once even when they alternate
(``Llama.set_cache``, as in llama-cpp-python, whose constructors these take: ``capacity_bytes``, ``cache_dir``)."""
from __future__ import annotations

import hashlib
import os
import pickle
from collections import OrderedDict

import numpy as np


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def state_nbytes(state) -> int:
    """The bytes a saved ``LlamaState`` holds (its KV arrays, logits and token ids)."""
    total = 0
    for value in (state.input_ids, state.numerics, state.last_logits, state.all_logits,
                  *(v for v in state.kv.values() if isinstance(v, np.ndarray))):
        if isinstance(value, np.ndarray):
            total += value.nbytes
    return total


class _PrefixCache:
    """What both caches share: ``lookup``/``store`` (what ``Llama`` calls on its worker thread before a
    generation evaluates its prompt and when it ends) and llama-cpp-python's mapping interface
    (``cache[tokens]`` gives the state sharing the longest prefix, ``cache[tokens] = state``, ``tokens in cache``,
    ``cache_size``). A saved state is used only when it shares at least ``min_gain`` more prompt tokens than
    the model's live KV cache does: by default 1, llama-cpp-python's rule (any longer prefix is loaded); a larger
    ``min_gain`` (ours) skips loads that save only a few tokens' evaluation (loading a state costs a copy)."""

    def __init__(self, capacity_bytes: int, capacity_states: int | None, min_gain: int):
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if capacity_states is not None and capacity_states < 1:
            raise ValueError(f"capacity_states must be at least 1, got {capacity_states}")
        self.capacity_bytes = int(capacity_bytes)
        self.capacity_states = None if capacity_states is None else int(capacity_states)
        self.min_gain = int(min_gain)
        self._sizes: OrderedDict = OrderedDict()   # key (token tuple) -> bytes, least recently used first

    # storage, per subclass
    def _get(self, key):
        raise NotImplementedError

    def _put(self, key, state) -> None:
        raise NotImplementedError

    def _drop(self, key) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def cache_size(self) -> int:
        return sum(self._sizes.values())

    def _best_key(self, prompt_tokens):
        best_key, best = None, 0
        for key in self._sizes:
            shared = common_prefix(key, prompt_tokens)
            if shared > best:
                best_key, best = key, shared
        return best_key, best

    def lookup(self, prompt_tokens, live_tokens):
        """The saved state to load before evaluating ``prompt_tokens``, or None (the live cache is as good)."""
        live = common_prefix(live_tokens, prompt_tokens)
        best_key, best = self._best_key(prompt_tokens)
        if best_key is None or best < live + self.min_gain:
            return None
        self._sizes.move_to_end(best_key)
        return self._get(best_key)

    def store(self, state) -> None:
        """Keep ``state`` (a ``LlamaState``); a saved state whose tokens are a prefix of its tokens is dropped."""
        key = tuple(int(t) for t in state.input_ids)
        if not key:
            return
        for old in [k for k in self._sizes if len(k) <= len(key) and key[:len(k)] == k]:
            self._drop(old)
            del self._sizes[old]
        self._put(key, state)
        self._sizes[key] = state_nbytes(state)
        while len(self._sizes) > 1 and (self.cache_size > self.capacity_bytes or (
                self.capacity_states is not None and len(self._sizes) > self.capacity_states)):
            old, _ = self._sizes.popitem(last=False)
            self._drop(old)

    # llama-cpp-python's BaseLlamaCache interface
    def __getitem__(self, key):
        best_key, _ = self._best_key(tuple(int(t) for t in key))
        if best_key is None:
            raise KeyError("Key not found")
        self._sizes.move_to_end(best_key)
        return self._get(best_key)

    def __contains__(self, key) -> bool:
        return self._best_key(tuple(int(t) for t in key))[0] is not None

    def __setitem__(self, key, state) -> None:
        if tuple(int(t) for t in key) != tuple(int(t) for t in state.input_ids):
            raise ValueError("the key must be the state's own tokens (state.input_ids)")
        self.store(state)


class LlamaRAMCache(_PrefixCache):
    """Saved ``LlamaState``s in memory, least recently used dropped first beyond ``capacity_bytes`` (llama-cpp-
    python's default, 2 GiB) or ``capacity_states`` states (ours; None: no count limit)."""

    def __init__(self, capacity_bytes: int = 2 << 30, *, capacity_states: int | None = None, min_gain: int = 1):
        super().__init__(capacity_bytes, capacity_states, min_gain)
        self._states: dict = {}

    def _get(self, key):
        return self._states[key]

    def _put(self, key, state) -> None:
        self._states[key] = state

    def _drop(self, key) -> None:
        self._states.pop(key, None)


class LlamaDiskCache(_PrefixCache):
    """Saved ``LlamaState``s as files in ``cache_dir`` (llama-cpp-python's default ``.cache/llama_cache``), up to
    ``capacity_bytes``. States a previous process left there are not reused (only what this cache stored)."""

    def __init__(self, cache_dir: str = ".cache/llama_cache", capacity_bytes: int = 2 << 30, *,
                 capacity_states: int | None = None, min_gain: int = 1):
        super().__init__(capacity_bytes, capacity_states, min_gain)
        self.cache_dir = str(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)

    def _path(self, key) -> str:
        digest = hashlib.sha256(np.asarray(key, dtype=np.int64).tobytes()).hexdigest()
        return os.path.join(self.cache_dir, f"{digest}.state")

    def _get(self, key):
        with open(self._path(key), "rb") as f:
            return pickle.load(f)

    def _put(self, key, state) -> None:
        path = self._path(key)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path + ".tmp", path)

    def _drop(self, key) -> None:
        try:
            os.remove(self._path(key))
        except FileNotFoundError:
            pass
