"""The key/value cache.

llama.cpp keeps K and V in float16; we keep float32 arrays holding float16-rounded values, which reproduces its
numbers while the attention kernel (model/attention.py, numba) reads float32 without a conversion per value; the
price is twice llama.cpp's cache memory.
Layout per layer: [n_head_kv, n_ctx, head_dim], so the first n positions of a head are one contiguous slice.
"""
from __future__ import annotations

import numpy as np

from ..quant.activations import round_to_f16_inplace


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((n_layer, n_head_kv, n_ctx, head_dim_k), dtype=np.float32)
        self.v = np.zeros((n_layer, n_head_kv, n_ctx, head_dim_v), dtype=np.float32)
        self.n_past = 0   # positions 0..n_past-1 are filled

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: [n_tokens, n_head_kv, head_dim] for positions start .. start+n_tokens-1."""
        n = k.shape[0]
        self.k[layer, :, start:start + n] = round_to_f16_inplace(np.ascontiguousarray(k.transpose(1, 0, 2), dtype=np.float32))
        self.v[layer, :, start:start + n] = round_to_f16_inplace(np.ascontiguousarray(v.transpose(1, 0, 2), dtype=np.float32))

    def truncate(self, n: int) -> None:
        """Forget every position from n on."""
        self.n_past = min(self.n_past, n)

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep .. n_keep+n_discard-1 and move the rest down (llama.cpp's context shift).

        Keys were stored already rotated for their old positions; the caller re-rotates them (see
        Model.rerotate_keys) since a rotation by -n_discard positions is exact for RoPE."""
        src = slice(n_keep + n_discard, self.n_past)
        dst = slice(n_keep, self.n_past - n_discard)
        self.k[:, :, dst] = self.k[:, :, src].copy()
        self.v[:, :, dst] = self.v[:, :, src].copy()
        self.n_past -= n_discard

    def snapshot(self) -> dict:
        n = self.n_past
        return {"n_past": n, "k": self.k[:, :, :n].copy(), "v": self.v[:, :, :n].copy()}

    def restore(self, state: dict) -> None:
        n = state["n_past"]
        if n > self.n_ctx or state["k"].shape[:2] != self.k.shape[:2]:
            raise ValueError("saved state does not fit this model's KV cache")
        self.k[:, :, :n] = state["k"]
        self.v[:, :, :n] = state["v"]
        self.n_past = n
