"""The key/value cache, in llama.cpp's cache types: ``f16`` (its default and ours), ``f32`` and ``q8_0``.

Layout per layer: [n_head_kv, n_ctx, head_dim], so the first n positions of a head are one contiguous slice.
Storage by type (the attention kernel, model/attention.py, reads each one directly, converting as it goes):

    f32   float32 values as computed
    f16   uint16 half-float bit patterns, rounded to nearest even (ggml's GGML_FP32_TO_FP16); half the memory
    q8_0  int8 quants [.., head_dim] + uint16 half scales [.., head_dim / 32]: ggml's q8_0 blocks (34 bytes per
          32 values) split into two arrays so that a head's quants stay contiguous; a quarter of f32's memory.
          As llama.cpp does (since its PR 21038), each head's vector is first rotated by the normalized Hadamard
          matrix of the head's size when that is a multiple of 64 (and a power of two): the rotation spreads outlier dimensions (Qwen2.5's keys reach 100-200 in a few of 64)
          over all of them, so 8-bit blocks round them far less. Rotations are orthogonal: attention rotates q
          the same way for the scores and rotates the weighted values back (model/attention.py).

Types are named as llama.cpp's ``--cache-type-k/--cache-type-v`` name them, or given as ggml type ids
(llama-cpp-python's ``type_k``/``type_v``).
"""
from __future__ import annotations

import mmap

import numpy as np

from numba import njit, prange

from ..quant import quantize
from ..quant.floats import float_to_half_bits
from ..quant.simd import half_bits, half_to_float

CACHE_TYPES = ("f32", "f16", "q8_0")
DEFAULT_CACHE_TYPE = "f16"
GGML_TYPE_IDS = {0: "f32", 1: "f16", 8: "q8_0"}      # enum ggml_type
_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
_Q8_BLOCK = 32
#: a KV cache counts its memory in whole chunks of this many positions (see CacheTensor.grow); a new one starts
#: with one chunk
GROW_CHUNK = 256


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose memory the kernel supplies page by page as it is first written: a private anonymous
    mapping, its reserve costing address space only. A cache tensor takes one for all n_ctx positions at once, so
    that growing never copies: it used to reallocate and copy at each doubling (a 7B's first decode step after a
    256-token prompt spent 0.35 s of its 0.5 s there, and later doublings copy more). Huge pages are declined for
    it: a 2 MiB page would back the untouched positions of its neighbouring heads too (numpy asks for huge pages
    on large arrays, which is why ``np.zeros`` will not do: a 512 MB cache with 256 of its 2048 positions written
    held all 512 MB). Plain zeros where the platform has no such mapping."""
    n_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if n_bytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return np.zeros(shape, dtype)
    try:
        region = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE)
    except OSError as error:     # an address-space limit (ulimit -v) or a refused reservation
        raise MemoryError(f"cannot reserve {n_bytes / 2 ** 20:.1f} MiB for the KV cache: {error}") from error
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, dtype).reshape(shape)


# what else llama.cpp's --cache-type-k/v take (ggml type ids): refused as not implemented, not as nonsense
_OTHER_LLAMACPP_TYPES = {30: "bf16", 2: "q4_0", 3: "q4_1", 20: "iq4_nl", 6: "q5_0", 7: "q5_1"}


def cache_type(value, what: str = "cache type") -> str:
    """Normalise a cache type given by name (``"f16"``, any case) or by ggml type id (1) to its name.
    NotImplementedError for llama.cpp's other cache types, ValueError for anything else; both name the
    accepted ones."""
    if value is None:
        return DEFAULT_CACHE_TYPE
    name = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        name = GGML_TYPE_IDS.get(int(value)) or _OTHER_LLAMACPP_TYPES.get(int(value))
    elif isinstance(value, str):
        name = value.strip().lower()
    if name in CACHE_TYPES:
        return name
    accepted = ", ".join(f"{name} ({ggml_id})" for ggml_id, name in GGML_TYPE_IDS.items())
    if name in _OTHER_LLAMACPP_TYPES.values():
        raise NotImplementedError(f"{what} {value!r} is not implemented: choose one of {accepted}")
    raise ValueError(f"{what} {value!r} is not a cache type: choose one of {accepted}")


def cache_bytes(type_name: str, n_values: int) -> int:
    """Bytes that ``n_values`` cached values take in ``type_name`` (the memory check's estimate)."""
    return int(np.ceil(_BYTES_PER_VALUE[type_name] * n_values))


from functools import lru_cache


@lru_cache(maxsize=None)
def hadamard_rotation(size: int) -> np.ndarray | None:
    """The normalized Hadamard matrix of ``size`` (Sylvester's construction: symmetric and orthogonal, its own
    inverse) as float32, or None when size is not a power of two."""
    if size < 1 or size & (size - 1):
        return None
    h = np.ones((1, 1))
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    h = (h / np.sqrt(size)).astype(np.float32)
    h.setflags(write=False)
    return h


def rotates(head_dim: int) -> bool:
    """Whether a quantized cache stores heads of this size rotated: llama.cpp's rule (a multiple of 64), for
    the sizes a Hadamard matrix exists for (powers of two: 64, 128, 256, ...)."""
    return head_dim % 64 == 0 and hadamard_rotation(head_dim) is not None


def rotate(values: np.ndarray) -> np.ndarray:
    """The last axis (a head) times the normalized Hadamard matrix of its size: llama.cpp's rotation of quantized
    caches, computed as its CPU backend computes it (``_walsh_hadamard_rows``). Its own inverse, up to rounding.

    Not as a matrix product: numpy's would run BLAS, whose summation order depends on the CPU (OpenBLAS picks its
    kernels by CPU model), and the rotation feeds q8_0's rounding of every cached key, so a Sapphire Rapids and a
    Zen 4 gave different logits (the synthetic model's q8_0-key logits 0.041 from llama.cpp's on the one, within
    0.001 on the other)."""
    if hadamard_rotation(values.shape[-1]) is None:
        raise ValueError(f"no Hadamard rotation of size {values.shape[-1]} (a power of two is needed)")
    rows = np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty_like(rows)
    _walsh_hadamard_rows(rows.reshape(-1, rows.shape[-1]), out.reshape(-1, rows.shape[-1]))
    return out


@njit(cache=True, nogil=True)
def _walsh_hadamard_rows(rows, out):
    """out = each row times the normalized Hadamard matrix (Sylvester's order), as ggml's CPU backend computes
    llama.cpp's rotations (``ggml_compute_forward_fwht``): every value times 1 / sqrt(n) first, then log2(n)
    passes of butterflies (u + v, u - v) over pairs ``length`` apart, length 1, 2, 4, ...: the same float32
    operations on every CPU, n log n of them instead of the product's n * n."""
    n_rows, n = rows.shape
    scale = np.float32(1.0) / np.sqrt(np.float32(n))
    for r in range(n_rows):
        for j in range(n):
            out[r, j] = rows[r, j] * scale
        length = 1
        while length < n:
            for i in range(0, n, 2 * length):
                for j in range(i, i + length):
                    u = out[r, j]
                    v = out[r, j + length]
                    out[r, j] = u + v
                    out[r, j + length] = u - v
            length *= 2


@njit(cache=True, parallel=True, nogil=True)
def _dequantize_q8_0_kernel(quants, scales, start, out):
    n_head_kv, n, head_dim = out.shape
    for row in prange(n_head_kv * n):
        h = row // n
        j = row - h * n
        for b in range(head_dim // _Q8_BLOCK):
            d = half_to_float(scales[h, start + j, b])
            for i in range(b * _Q8_BLOCK, (b + 1) * _Q8_BLOCK):
                out[h, j, i] = d * np.float32(quants[h, start + j, i])


def dequantize_q8_0(data: np.ndarray, scales: np.ndarray, start: int, stop: int) -> np.ndarray:
    """float32 [n_head_kv, stop - start, head_dim]: positions start..stop-1 of one q8_0 cache layer (as stored,
    that is rotated where the tensor rotates)."""
    out = np.empty((data.shape[0], stop - start, data.shape[2]), np.float32)
    _dequantize_q8_0_kernel(data, scales, start, out)
    return out


@njit(cache=True, nogil=True)
def _write_half_tokens(data, il, start, values):
    """data[il, h, start + t, :] = the half bits of values[t, h, :] (the f16 cache's store)."""
    for t in range(values.shape[0]):
        for h in range(values.shape[1]):
            for i in range(values.shape[2]):
                data[il, h, start + t, i] = half_bits(values[t, h, i])


class CacheTensor:
    """K or V of every layer, [n_layer, n_head_kv, n_ctx, head_dim], stored as ``kind``.

    The arrays span all n_ctx positions from the start (``lazy_zeros``: memory comes page by page as positions
    are written), and ``capacity`` counts the positions the tensor holds memory for, in whole GROW_CHUNKs (default
    all n_ctx): ``write`` and ``load`` raise it on demand (``grow``, which never copies), ``release`` gives the
    memory back, so a sequence holds memory for what it has evaluated, not for the whole context it may reach."""

    def __init__(self, kind: str, shape: tuple[int, int, int, int], capacity: int | None = None):
        self.kind = kind
        self.n_ctx = shape[2]
        head_dim = shape[-1]
        if kind not in CACHE_TYPES:
            raise ValueError(f"unknown cache type {kind!r}")
        if kind == "q8_0" and head_dim % _Q8_BLOCK:
            raise ValueError(f"cache type q8_0 needs a head size that is a multiple of {_Q8_BLOCK}; this "
                             f"model's is {head_dim}")
        self._dtype = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8}[kind]
        self._shape = shape
        # quantized storage holds each head's vector rotated (see the module docstring)
        self.rotated = kind == "q8_0" and rotates(head_dim)
        self._map()
        self._capacity = self.n_ctx if capacity is None else max(0, min(int(capacity), self.n_ctx))

    def _map(self) -> None:
        """Fresh arrays for all n_ctx positions (zeros; no memory until written)."""
        n_layer, n_head_kv, n_ctx, head_dim = self._shape
        self.data = lazy_zeros(self._shape, self._dtype)
        # q8_0's half scales, one per 32 values; float types have none
        self.scales = (lazy_zeros((n_layer, n_head_kv, n_ctx, head_dim // _Q8_BLOCK), np.uint16)
                       if self.kind == "q8_0" else None)

    @property
    def capacity(self) -> int:
        """Positions the tensor holds memory for now (at most n_ctx)."""
        return self._capacity

    @property
    def max_nbytes(self) -> int:
        """The memory this tensor takes at n_ctx positions."""
        return self._bytes_for(self.n_ctx)

    def _bytes_for(self, positions: int) -> int:
        n_layer, n_head_kv, _, head_dim = self._shape
        per_position = self.data.itemsize * head_dim + (2 * head_dim // _Q8_BLOCK if self.scales is not None else 0)
        return n_layer * n_head_kv * positions * per_position

    def grow(self, n: int) -> None:
        """Make room for positions 0..n-1, counted in whole GROW_CHUNKs up to n_ctx. Nothing moves: the arrays
        span n_ctx positions already, and the pages of the new positions come when they are written."""
        if n <= self._capacity:
            return
        if n > self.n_ctx:
            raise ValueError(f"{n} positions do not fit the context of {self.n_ctx}")
        self._capacity = min(self.n_ctx, -(-n // GROW_CHUNK) * GROW_CHUNK)

    def release(self) -> None:
        """Give the memory back (the values are gone; writing again takes pages anew)."""
        self._map()
        self._capacity = 0

    @property
    def nbytes(self) -> int:
        """The memory held for ``capacity`` positions."""
        return self._bytes_for(self._capacity)

    def layer(self, il: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(values, scales, whether they are stored rotated) of layer ``il`` for the attention kernel."""
        return self.data[il], None if self.scales is None else self.scales[il], self.rotated

    def write(self, il: int, start: int, rows: np.ndarray) -> None:
        """rows: float32 [n_head_kv, n, head_dim] for positions start .. start+n-1 of layer ``il``."""
        n = rows.shape[1]
        self.grow(start + n)
        if self.kind == "f32":
            self.data[il, :, start:start + n] = rows
        elif self.kind == "f16":
            self.data[il, :, start:start + n] = float_to_half_bits(rows)
        else:
            if self.rotated:
                rows = rotate(rows)
            blocks = quantize("q8_0", np.ascontiguousarray(rows, dtype=np.float32)).reshape(-1, 2 + _Q8_BLOCK)
            self.data[il, :, start:start + n] = blocks[:, 2:].view(np.int8).reshape(rows.shape)
            self.scales[il, :, start:start + n] = (
                np.ascontiguousarray(blocks[:, :2]).view(np.uint16).reshape(rows.shape[:2] + (-1,)))

    def write_tokens(self, il: int, start: int, values: np.ndarray) -> None:
        """values: float32 [n, n_head_kv, head_dim] (the forward pass's layout, any strides) for positions start ..
        start+n-1 of layer ``il``: ``write`` of their transpose; f16 in one kernel call (a decode step of 16
        sequences stores 2 x 16 x n_layer times: the transposed copy and numpy's conversion cost 4-5 ms of it)."""
        if self.kind == "f16" and values.dtype == np.float32:
            self.grow(start + values.shape[0])
            _write_half_tokens(self.data, il, start, values)
        else:
            self.write(il, start, np.ascontiguousarray(values.transpose(1, 0, 2), dtype=np.float32))

    def read(self, il: int, start: int, stop: int) -> np.ndarray:
        """float32 [n_head_kv, stop-start, head_dim]: the stored values of positions start..stop-1, as floats."""
        data = self.data[il, :, start:stop]
        if self.kind == "f32":
            return data.copy()
        if self.kind == "f16":
            return data.view(np.float16).astype(np.float32)
        values = dequantize_q8_0(self.data[il], self.scales[il], start, stop)
        return rotate(values) if self.rotated else values

    def move(self, src: slice, dst: slice) -> None:
        """Copy positions ``src`` onto ``dst`` (the same length) in every layer and head."""
        self.data[:, :, dst] = self.data[:, :, src].copy()
        if self.scales is not None:
            self.scales[:, :, dst] = self.scales[:, :, src].copy()

    def saved(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.data[:, :, :n].copy(), None if self.scales is None else self.scales[:, :, :n].copy()

    def load(self, saved: tuple[np.ndarray, np.ndarray | None]) -> None:
        data, scales = saved
        n = data.shape[2]
        self.grow(n)
        self.data[:, :, :n] = data
        if scales is not None:
            self.scales[:, :, :n] = scales


class KVCache:
    """One sequence's keys and values for every layer, positions 0..n_past-1.

    Memory is taken as the sequence grows (``CacheTensor.grow``): ``capacity`` positions at first (default one
    GROW_CHUNK, at most n_ctx), then in chunks up to n_ctx; ``release`` returns it."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim_k: int, head_dim_v: int,
                 type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE, capacity: int | None = None):
        self.n_ctx = n_ctx
        self.type_k = cache_type(type_k, "type_k")
        self.type_v = cache_type(type_v, "type_v")
        capacity = min(n_ctx, GROW_CHUNK) if capacity is None else capacity
        self.k = CacheTensor(self.type_k, (n_layer, n_head_kv, n_ctx, head_dim_k), capacity)
        self.v = CacheTensor(self.type_v, (n_layer, n_head_kv, n_ctx, head_dim_v), capacity)
        self.n_past = 0   # positions 0..n_past-1 are filled

    @property
    def capacity(self) -> int:
        return min(self.k.capacity, self.v.capacity)

    @property
    def max_nbytes(self) -> int:
        """The memory the cache takes once it holds n_ctx positions (``nbytes`` is what it holds now)."""
        return self.k.max_nbytes + self.v.max_nbytes

    def release(self) -> None:
        """Forget everything and give the memory back (a later store allocates again)."""
        self.n_past = 0
        self.k.release()
        self.v.release()

    def copy_prefix_from(self, other: "KVCache", n: int) -> None:
        """Make this cache hold ``other``'s first n positions (llama.cpp's seq_cp): the same stored values, so
        attention over them gives the numbers ``other`` gets."""
        if n > other.n_past:
            raise ValueError(f"the source sequence has {other.n_past} positions, not {n}")
        if n > self.n_ctx:
            raise ValueError(f"{n} positions do not fit the context of {self.n_ctx}")
        if (other.type_k, other.type_v) != (self.type_k, self.type_v) or other.k.data.shape[:2] != self.k.data.shape[:2]:
            raise ValueError("the two caches differ in cache types or shape")
        self.k.load(other.k.saved(n))
        self.v.load(other.v.saved(n))
        self.n_past = n

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: [n_tokens, n_head_kv, head_dim] for positions start .. start+n_tokens-1."""
        self.k.write_tokens(layer, start, k)
        self.v.write_tokens(layer, start, v)

    def truncate(self, n: int) -> None:
        """Forget every position from n on (the memory stays, for the positions that will replace them)."""
        self.n_past = min(self.n_past, max(0, n))

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions n_keep .. n_keep+n_discard-1 and move the rest down (llama.cpp's context shift).

        Keys were stored already rotated for their old positions; the caller re-rotates them (see
        Model.rerotate_keys) since a rotation by -n_discard positions is exact for RoPE."""
        src = slice(n_keep + n_discard, self.n_past)
        dst = slice(n_keep, self.n_past - n_discard)
        self.k.move(src, dst)
        self.v.move(src, dst)
        self.n_past -= n_discard

    def snapshot(self) -> dict:
        """The filled positions, as arrays in their storage types (scales None for float types)."""
        n = self.n_past
        (k, k_scales), (v, v_scales) = self.k.saved(n), self.v.saved(n)
        return {"n_past": n, "type_k": self.type_k, "type_v": self.type_v, "k": k, "k_scales": k_scales,
                "v": v, "v_scales": v_scales}

    def restore(self, state: dict) -> None:
        n = state["n_past"]
        if (n > self.n_ctx or state.get("type_k") != self.type_k or state.get("type_v") != self.type_v
                or state["k"].shape[:2] != self.k.data.shape[:2]):
            raise ValueError("saved state does not fit this context's KV cache (its size or cache types differ)")
        self.k.load((state["k"], state["k_scales"]))
        self.v.load((state["v"], state["v_scales"]))
        self.n_past = n


class MultiSequenceCache:
    """KV caches of several sequences of one model, keyed by sequence id (any hashable; the continuous batcher
    uses ints), each with its own positions: llama.cpp's multi-sequence cache operations on separate per-sequence
    caches. Memory comes as sequences grow (``KVCache``) and goes back when one is removed.

    ``copy_prefix(src, dst, n)`` is llama.cpp's ``seq_cp``: ``dst`` starts from ``src``'s first n positions (a
    system prompt cached once, ``n > 1`` completions sharing their prompt). It copies the stored values rather
    than sharing them: the sequences then diverge without copy-on-write bookkeeping, and the copy (a few MB for a
    long prompt) costs far less than evaluating the prompt again."""

    def __init__(self, model, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE):
        self.model = model
        self.n_ctx = int(n_ctx)
        self.type_k = cache_type(type_k, "type_k")
        self.type_v = cache_type(type_v, "type_v")
        self._caches: dict = {}

    def add(self, seq_id) -> KVCache:
        """A new empty sequence (ValueError if the id is taken)."""
        if seq_id in self._caches:
            raise ValueError(f"sequence {seq_id!r} exists already")
        cache = self.model.new_cache(self.n_ctx, self.type_k, self.type_v, capacity=0)
        self._caches[seq_id] = cache
        return cache

    def remove(self, seq_id) -> None:
        """End a sequence: its memory goes back at once (KeyError for an unknown id)."""
        self._caches.pop(self._known(seq_id)).release()

    def truncate(self, seq_id, n: int) -> None:
        """Keep the first n positions of a sequence (llama.cpp's seq_rm from n on)."""
        self[seq_id].truncate(n)

    def copy_prefix(self, src, dst, n: int | None = None) -> KVCache:
        """Sequence ``dst`` (created if new, replaced if not) starts as ``src``'s first n positions (default all)."""
        source = self[src]
        n = source.n_past if n is None else int(n)
        cache = self._caches.get(dst)
        if cache is None:
            cache = self.add(dst)
        cache.copy_prefix_from(source, n)
        return cache

    def n_past(self, seq_id) -> int:
        return self[seq_id].n_past

    def _known(self, seq_id):
        if seq_id not in self._caches:
            raise KeyError(f"no sequence {seq_id!r}")
        return seq_id

    def __getitem__(self, seq_id) -> KVCache:
        return self._caches[self._known(seq_id)]

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._caches

    def __len__(self) -> int:
        return len(self._caches)

    def __iter__(self):
        return iter(list(self._caches))

    @property
    def nbytes(self) -> int:
        """Memory held now by every sequence."""
        return sum(cache.nbytes for cache in self._caches.values())
