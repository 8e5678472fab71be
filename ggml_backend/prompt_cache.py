"""``LlamaRAMCache``: evaluated prompts' states kept in memory, so prompts that share a head (the same system
prompt, the same tool list) are evaluated once even when they alternate (``Llama.set_cache``, as in
llama-cpp-python)."""
from __future__ import annotations

from collections import OrderedDict


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaRAMCache:
    """Up to ``capacity_states`` saved ``LlamaState``s, least recently used dropped first.

    ``Llama`` calls ``lookup`` on its worker thread before a generation evaluates its prompt and ``store`` when
    the generation ends, so neither needs a lock of its own. A saved state is used only when it shares at least
    ``min_gain`` more prompt tokens than the model's live KV cache does (loading a state costs a copy).
    """

    def __init__(self, capacity_states: int = 8, min_gain: int = 8):
        if capacity_states < 1:
            raise ValueError(f"capacity_states must be at least 1, got {capacity_states}")
        self.capacity_states = int(capacity_states)
        self.min_gain = int(min_gain)
        self._states: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def lookup(self, prompt_tokens, live_tokens):
        """The saved state to load before evaluating ``prompt_tokens``, or None (the live cache is as good)."""
        live = common_prefix(live_tokens, prompt_tokens)
        best_key, best = None, live
        for key in self._states:
            shared = common_prefix(key, prompt_tokens)
            if shared > best:
                best_key, best = key, shared
        if best_key is None or best < live + self.min_gain:
            return None
        self._states.move_to_end(best_key)
        return self._states[best_key]

    def store(self, state) -> None:
        """Keep ``state`` (a ``LlamaState``); a saved state whose tokens are a prefix of its tokens is dropped."""
        key = tuple(int(t) for t in state.input_ids)
        if not key:
            return
        for old in [k for k in self._states if len(k) <= len(key) and key[:len(k)] == k]:
            del self._states[old]
        self._states[key] = state
        while len(self._states) > self.capacity_states:
            self._states.popitem(last=False)
