"""The host side of the device kernels: the table from ggml type to kernel (like quant/types.py's table for the
CPU), weight upload, and the calls the layer forward makes (``DeviceMatrix.__call__``, ``rms_norm``, ...).

Weights are uploaded as the file stores them: the quantized blocks, uint8 [n_rows, row_bytes] (no dequantized
copy); f32 as float32, f16 / bf16 as their uint16 bit patterns.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..model.kv_cache import hadamard_rotation
from ..quant.layouts import file_layout
from ..quant.matmul import BLAS_MIN_TOKENS
from ..quant.types import get_type
from . import blocks
from .gemm import gemm_kernel
from .matvec import dequantize_kernel, float_matvec_kernel, launch_matvec
from .ops import (ATTENTION_SLICE, ATTENTION_SPLITS, CACHE_F16, CACHE_F32, CACHE_Q8_0, NORM_THREADS, add_kernel,
                  attention_scores_kernel, attention_softmax_kernel, attention_values_kernel, copy_columns_kernel,
                  gather_rows_kernel, geglu_kernel, q8_0_round_trip_kernel, rms_norm_kernel, rope_kernel,
                  rotate_kernel, store_kv_kernel, store_kv_q8_0_kernel, swiglu_kernel)
from .quantize import quantize_q8_0_warp_kernel, quantize_q8_K_kernel, round_rows_kernel
from .runtime import MAX_THREADS, import_cuda, import_cupy, launch_shape

cuda = import_cuda()


@dataclass(frozen=True)
class DeviceType:
    kind: int                 # blocks.Q4_0 ...: which layout the kernels read
    vec_dot_type: str         # what the activations are quantized / rounded to (quant/types.py's vec_dot_type)


# One row per weight type the CPU computes (quant/matmul.SUPPORTED_TYPES).
DEVICE_TYPES: dict[str, DeviceType] = {
    "f32": DeviceType(blocks.F32, "f32"),
    "f16": DeviceType(blocks.F16, "f16"),
    "bf16": DeviceType(blocks.BF16, "bf16"),
    "q4_0": DeviceType(blocks.Q4_0, "q8_0"),
    "q4_1": DeviceType(blocks.Q4_1, "q8_1"),
    "q5_0": DeviceType(blocks.Q5_0, "q8_0"),
    "q5_1": DeviceType(blocks.Q5_1, "q8_1"),
    "q8_0": DeviceType(blocks.Q8_0, "q8_0"),
    "q2_K": DeviceType(blocks.Q2_K, "q8_K"),
    "q3_K": DeviceType(blocks.Q3_K, "q8_K"),
    "q4_K": DeviceType(blocks.Q4_K, "q8_K"),
    "q5_K": DeviceType(blocks.Q5_K, "q8_K"),
    "q6_K": DeviceType(blocks.Q6_K, "q8_K"),
}
_FLOAT_KINDS = (blocks.F32, blocks.F16, blocks.BF16)
_EMPTY = {}


# Where this thread's launches go: a stream (0: the default one); while a decode step's arrays are recorded for a
# CUDA graph, the list that keeps them alive (the graph holds their addresses); while it is captured, the arrays of
# that recording, handed out again in the same order (no allocation while capturing). See offload.DecodeGraph.
_launching = threading.local()


def stream():
    return getattr(_launching, "stream", 0)


@contextmanager
def launching_on(launch_stream, keep: list | None = None, reuse=None):
    """Kernel launches, copies and allocations of this thread made through this module go to ``launch_stream``;
    arrays allocated meanwhile are appended to ``keep`` when given, or taken from the deque ``reuse``."""
    before = stream(), getattr(_launching, "keep", None), getattr(_launching, "reuse", None)
    _launching.stream, _launching.keep, _launching.reuse = launch_stream, keep, reuse
    try:
        yield
    finally:
        _launching.stream, _launching.keep, _launching.reuse = before


def empty(shape, dtype=np.float32):
    """A new device array (kept for, or taken from, a graph's recording; see launching_on)."""
    reuse = getattr(_launching, "reuse", None)
    if reuse is not None:
        array = reuse.popleft() if reuse else None
        if array is None or tuple(array.shape) != tuple(np.atleast_1d(shape)) or array.dtype != np.dtype(dtype):
            raise RuntimeError("a captured decode step asked for other arrays than its recorded run")
        return array
    array = cuda.device_array(shape, dtype, stream=stream())
    keep = getattr(_launching, "keep", None)
    if keep is not None:
        keep.append(array)
    return array


def _grid(n_items: int) -> int:
    return max(1, min(n_items, launch_shape().blocks))


def _threads() -> int:
    return min(launch_shape().threads, MAX_THREADS)


def _flat_launch(n_items: int):
    """(blocks, threads, stream) for the one-thread-per-item kernels."""
    threads = 128 if launch_shape().threads >= 32 else launch_shape().threads
    return _grid((n_items + threads - 1) // threads), threads, stream()


def _row_launch(n_items: int):
    """(blocks, threads, stream) for the kernels whose blocks reduce an item (a row, a token's head) together."""
    return _grid(n_items), _threads(), stream()


# blocks of the warp-per-item kernels on a GPU, and at most this many blocks a launch: about two waves of an H200
# (132 SMs, 64 warps each); their items are looped over with a grid stride beyond that
WARPS_PER_BLOCK = 4
MAX_WARP_BLOCKS = 4096


def _warp_launch(n_items: int):
    """(blocks, threads, stream) for the kernels that give a warp to each item (attention's scores): blocks of
    WARPS_PER_BLOCK warps on a GPU; in the simulator, where a block stands for a warp, _row_launch's shape."""
    if launch_shape().threads < 32:
        return _row_launch(n_items)
    blocks = max(1, min((n_items + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK, MAX_WARP_BLOCKS))
    return blocks, 32 * WARPS_PER_BLOCK, stream()


def _block_launch(n_items: int, threads: int):
    """(blocks, threads, stream): a block of ``threads`` per item on a GPU (no more than the kernel's shared
    reduction array holds), _row_launch's shape in the simulator."""
    if launch_shape().threads < 32:
        return _row_launch(n_items)
    return _grid(n_items), threads, stream()


def empty_vector():
    """A float32 device array of length 0: "no bias" for the kernels (numba kernels take no None)."""
    if "vector" not in _EMPTY:
        _EMPTY["vector"] = cuda.to_device(np.zeros(0, np.float32))
    return _EMPTY["vector"]


def upload_weights(qtype, data: np.ndarray, n_rows: int, n_cols: int):
    """The matrix as the device keeps it (see the module docstring)."""
    name = get_type(qtype).name
    data = np.ascontiguousarray(data).reshape(n_rows, -1)
    if name == "f32":
        return cuda.to_device(data.view(np.float32).reshape(n_rows, n_cols))
    if name in ("f16", "bf16"):
        return cuda.to_device(data.view(np.uint16).reshape(n_rows, n_cols))
    return cuda.to_device(data)


class DeviceActivations:
    """One activation matrix [n, k] on the device with its quantized / rounded forms, made once per vec_dot type
    and shared by the weights that read the same input (q/k/v; gate/up), as the CPU's ``matmul_many`` does."""

    def __init__(self, x):
        self.x = x
        self._forms: dict[str, tuple] = {}

    def form(self, vec_dot_type: str) -> tuple:
        if vec_dot_type in self._forms:
            return self._forms[vec_dot_type]
        x = self.x
        n, k = x.shape
        if vec_dot_type in ("q8_0", "q8_1"):
            qs = empty((n, k), np.int8)
            d = empty((n, k // 32), np.float32)
            sums = empty((n, k // 32), np.float32)
            quantize_q8_0_warp_kernel[_warp_launch(n * k // 32)](x, qs, d, sums)
            result = (qs, d, sums)
        elif vec_dot_type == "q8_K":
            qs = empty((n, k), np.int8)
            d = empty((n, k // 256), np.float32)
            bsums = empty((n, k // 16), np.int32)
            quantize_q8_K_kernel[_flat_launch(n * k // 256)](x, qs, d, bsums)
            result = (qs, d, bsums)
        elif vec_dot_type in ("f16", "bf16"):
            rounded = empty((n, k), np.float32)
            round_rows_kernel[_flat_launch(n * k)](x, rounded, vec_dot_type == "bf16")
            result = (rounded,)
        else:
            result = (x,)
        self._forms[vec_dot_type] = result
        return result


class DeviceMatrix:
    """A weight matrix [n_out, n_in] on the device (+ optional float32 bias)."""

    def __init__(self, qtype, data: np.ndarray, n_out: int, n_in: int, bias: np.ndarray | None = None):
        qtype, data = file_layout(qtype, data)    # a CPU-only layout (quant/layouts.py) back in the file's
        name = qtype.name
        if name not in DEVICE_TYPES:
            raise ValueError(f"weight type {name} has no CUDA kernel (supported: {', '.join(DEVICE_TYPES)})")
        self.type_name = name
        self.type = DEVICE_TYPES[name]
        self.n_out, self.n_in = n_out, n_in
        self.w = upload_weights(name, data, n_out, n_in)
        self.bias = cuda.to_device(np.ascontiguousarray(bias, np.float32)) if bias is not None else empty_vector()
        self.nbytes = int(np.asarray(data).nbytes) + (0 if bias is None else 4 * n_out)

    def __call__(self, acts: DeviceActivations, out=None):
        """acts.x [n, n_in] -> float32 [n, n_out]: the mat-vec kernels below BLAS_MIN_TOKENS tokens, the
        dequantized-band GEMM from there on (the CPU path's switch)."""
        n = acts.x.shape[0]
        if out is None:
            out = empty((n, self.n_out), np.float32)
        if n >= BLAS_MIN_TOKENS:
            self._gemm(acts.x, out)
            return out
        kind = self.type.kind
        form = acts.form(self.type.vec_dot_type)
        grid, threads = _grid(n * self.n_out), _threads()
        if kind in _FLOAT_KINDS:
            float_matvec_kernel(kind)[grid, threads, stream()](self.w, form[0], self.bias, out)
        else:
            launch_matvec(kind, self.w, form[0], form[1], form[2], self.bias, out, n, self.n_out, stream())
        return out

    # rows of W dequantized per GEMM call: 64 MiB of float32 at most, whatever the matrix
    BAND_BYTES = 64 << 20

    def _gemm(self, x, out, cupy=None) -> None:
        """out = x @ W.T (+ bias) on bands of W dequantized to float32: multiplied by cuBLAS where CuPy is there
        (runtime.import_cupy), else by the numba tiled kernel. ``cupy``: False forces the numba kernel."""
        cupy = import_cupy() if cupy is None else (cupy or None)
        tile = launch_shape().tile
        band_rows = max(tile, min(self.n_out, self.BAND_BYTES // (4 * self.n_in)) // tile * tile)
        band = empty((min(band_rows, self.n_out), self.n_in), np.float32)
        kernel = gemm_kernel(tile)
        n = x.shape[0]
        for first in range(0, self.n_out, band_rows):
            rows = min(band_rows, self.n_out - first)
            tile_rows = band[:rows]
            n_items = rows * self.n_in if self.type.kind in _FLOAT_KINDS else rows * self.n_in // 32
            dequantize_kernel(self.type.kind)[_flat_launch(n_items)](self.w, first, tile_rows)
            bias = self.bias[first:first + rows] if self.bias.shape[0] else self.bias
            if cupy is not None:
                product = cupy.asarray(x) @ cupy.asarray(tile_rows).T
                if bias.shape[0]:
                    product += cupy.asarray(bias)
                cupy.asarray(out)[:, first:first + rows] = product
                continue
            n_tiles = ((n + tile - 1) // tile) * ((rows + tile - 1) // tile)
            kernel[_grid(n_tiles), (tile, tile), stream()](x, tile_rows, bias, first, out)

    def dequantize(self, first: int = 0, last: int | None = None) -> np.ndarray:
        """Rows first..last-1 as float32 on the host (tests compare them with the CPU's dequantization)."""
        last = self.n_out if last is None else last
        out = empty((last - first, self.n_in), np.float32)
        n_items = (last - first) * self.n_in
        if self.type.kind not in _FLOAT_KINDS:
            n_items //= 32
        dequantize_kernel(self.type.kind)[_flat_launch(n_items)](self.w, first, out)
        return out.copy_to_host()


class DeviceProjection:
    """Weight matrices that read the same input (q/k/v; gate/up), as one product where they can be one: the same
    type and input width, and biases on all or none. Their rows are then uploaded one after the other as a single
    matrix, so a decode step launches one mat-vec kernel instead of three (or two); every row is computed as it
    would be alone, so the numbers do not change. Each matrix's part of the output comes back as its own array:
    a view for one token, a copy of its columns for more."""

    def __init__(self, linears):
        kinds = {(get_type(linear.qtype).name, linear.n_in, linear.bias is None) for linear in linears}
        self.widths = [linear.n_out for linear in linears]
        if len(kinds) == 1 and len(linears) > 1:
            first = linears[0]
            data = np.concatenate([np.asarray(linear.data).reshape(linear.n_out, -1) for linear in linears])
            bias = None if first.bias is None else np.concatenate([linear.bias for linear in linears])
            self.fused = DeviceMatrix(first.qtype, data, sum(self.widths), first.n_in, bias)
            self.matrices = None
        else:
            self.fused = None
            self.matrices = [DeviceMatrix(linear.qtype, linear.data, linear.n_out, linear.n_in, linear.bias)
                             for linear in linears]

    def __call__(self, acts: DeviceActivations) -> list:
        if self.fused is None:
            return [matrix(acts) for matrix in self.matrices]
        out = self.fused(acts)
        n = out.shape[0]
        flat = out.reshape(out.size) if n == 1 else None
        parts, first = [], 0
        for width in self.widths:
            if n == 1:
                parts.append(flat[first:first + width].reshape(1, width))
            else:
                part = empty((n, width), np.float32)
                copy_columns_kernel[_flat_launch(n * width)](out, first, part)
                parts.append(part)
            first += width
        return parts


# --- the other operations, as calls --------------------------------------------------------------------------

def rms_norm(x, weight, eps: float, out=None):
    """x [n, k] (or any shape whose last axis the weight [k] scales) -> a new array of x's shape."""
    shape = tuple(x.shape)           # (the simulator's shapes take no negative index)
    k = shape[len(shape) - 1]
    rows = x.reshape(x.size // k, k)
    result = empty(shape, np.float32) if out is None else out
    rms_norm_kernel[_block_launch(rows.shape[0], NORM_THREADS)](rows, weight, np.float32(eps),
                                                                result.reshape(x.size // k, k))
    return result


def add(x, y) -> None:
    add_kernel[_flat_launch(x.size)](x, y)


def glu(gate, up, activation: str) -> None:
    """gate = act(gate) * up (SwiGLU or GeGLU), in place."""
    kernel = swiglu_kernel if activation == "silu" else geglu_kernel
    kernel[_flat_launch(gate.size)](gate, up)


def rope(x, cos, sin, n_dims: int, mode: str) -> None:
    n_tokens, n_heads, _ = x.shape
    rope_kernel[_flat_launch(n_tokens * n_heads * (n_dims // 2))](x, cos, sin, n_dims, mode == "neox")


_CACHE_KINDS = {"f32": CACHE_F32, "f16": CACHE_F16, "q8_0": CACHE_Q8_0}
_HADAMARD: dict = {}


class DeviceCacheLayer:
    """K or V of one layer on the device, stored as model/kv_cache.CacheTensor stores it: ``data`` [n_head_kv,
    n_ctx, head_dim] (float32, half bits or q8_0 quants), ``scales`` (q8_0's half scales; a dummy otherwise),
    ``rotated`` (q8_0 heads of a size with a Hadamard matrix are stored rotated)."""

    def __init__(self, kind: str, host_data: np.ndarray, host_scales: np.ndarray | None, rotated: bool):
        self.kind = _CACHE_KINDS[kind]
        self.data = cuda.to_device(host_data)
        self.scales = cuda.to_device(host_scales if host_scales is not None else np.zeros((1, 1, 1), np.uint16))
        self.rotated = rotated

    @property
    def head_dim(self) -> int:
        return self.data.shape[2]


def rotate(x):
    """x [..., k] times the normalized Hadamard matrix of size k (model/kv_cache.rotate), a new array."""
    shape = tuple(x.shape)
    k = shape[len(shape) - 1]
    if k not in _HADAMARD:
        _HADAMARD[k] = cuda.to_device(np.ascontiguousarray(hadamard_rotation(k)))
    out = empty(shape, np.float32)
    rotate_kernel[_flat_launch(x.size)](x.reshape(x.size // k, k), _HADAMARD[k], out.reshape(x.size // k, k))
    return out


def positions(starts) -> tuple:
    """The first positions of a pass's sequences as the cache kernels read them: a device int32 array (a CUDA
    graph's launches read it again at each replay, where a number would be frozen into the graph)."""
    return cuda.to_device(np.asarray(starts, np.int32).reshape(-1))


def store_kv(src, layer: DeviceCacheLayer, starts, span: int = 0) -> None:
    """src [n_tokens, n_head_kv, head_dim] into positions starts[span].. of a cache layer (``starts``: a device
    array from ``positions``, or a number)."""
    if not hasattr(starts, "copy_to_host"):
        starts = positions([starts])
    if layer.kind == CACHE_Q8_0:
        if layer.rotated:
            src = rotate(src)
        rows = src.reshape(src.shape[0] * src.shape[1], src.shape[2])
        store_kv_q8_0_kernel[_flat_launch(src.size // 32)](rows, layer.data, layer.scales, starts, span)
    else:
        store_kv_kernel[_flat_launch(src.size)](src, layer.data, starts, span, layer.kind == CACHE_F16)


def attention(q, keys: DeviceCacheLayer, values: DeviceCacheLayer, starts, group: int, window: int,
              scale: float, out, span: int = 0, n_keys_max: int | None = None, probs=None):
    """q [n, n_head, hd_k] -> out [n, n_head * hd_v], over cache layers filled up to starts[span] + n (``starts``
    as store_kv takes it). q meets the keys as model/attention.attention prepares it: rounded to f16 for f16
    keys; for q8_0 keys rotated as they are and quantized to q8_0 and back; weighted sums of rotated values are
    rotated back. ``n_keys_max``: the scratch's width when starts is a device array (a graph's: the cache's
    n_ctx); by default starts + n. ``probs``: that scratch, [n * n_head, >= n_keys_max], when the caller keeps one
    for all layers."""
    n_tokens, n_head, hd_k = q.shape
    if not hasattr(starts, "copy_to_host"):
        n_keys_max = starts + n_tokens if n_keys_max is None else n_keys_max
        starts = positions([starts])
    if n_keys_max is None:
        raise ValueError("attention with device positions needs n_keys_max")
    if keys.kind == CACHE_F16:
        q = round_to_f16(q)
    elif keys.kind == CACHE_Q8_0:
        q = rotate(q) if keys.rotated else copy(q)
        q8_0_round_trip_kernel[_flat_launch(q.size // 32)](q.reshape(n_tokens * n_head, hd_k))
    if probs is None:
        probs = empty((n_tokens * n_head, n_keys_max), np.float32)
    target = empty(out.shape, np.float32) if values.rotated else out
    launch_attention(q, keys, values, probs, target, starts, span, group, window, scale, n_keys_max)
    if values.rotated:   # out [n, n_head * hd_v]: each head's slice rotated back
        hd_v = values.head_dim
        rotated_back = rotate(target.reshape(n_tokens, n_head, hd_v))
        copy_into(rotated_back.reshape(n_tokens, n_head * hd_v), out)
    return out


def launch_attention(q, keys: DeviceCacheLayer, values: DeviceCacheLayer, probs, out, starts, span: int, group: int,
                     window: int, scale: float, n_keys_max: int) -> None:
    """ops.attention_kernel's result by its three phases (ops.attention_scores_kernel, _softmax_, _values_), q
    prepared for the keys already. The scores' launch is sized for n_keys_max keys a row (the last token's at
    most; within the window); their kernel reads how many there are from the device."""
    n_tokens, n_head, _ = q.shape
    rows = n_tokens * n_head
    most_keys = min(n_keys_max, window) if window > 0 else n_keys_max
    attention_scores_kernel[_warp_launch(rows * max(1, most_keys))](
        q, keys.data, keys.scales, keys.kind, probs, starts, span, group, window, np.float32(scale))
    attention_softmax_kernel[_block_launch(rows, MAX_THREADS)](probs, values.kind, starts, span, n_tokens, n_head,
                                                                window)
    n_slices = (values.head_dim + ATTENTION_SLICE - 1) // ATTENTION_SLICE
    attention_values_kernel[_block_launch(rows * n_slices, ATTENTION_SPLITS * ATTENTION_SLICE)](
        probs, values.data, values.scales, values.kind, out, starts, span, group, window)


def copy(x):
    out = empty(tuple(x.shape), np.float32)
    out.copy_to_device(x, stream=stream())
    return out


_ROW_NUMBERS: dict = {}


def copy_into(src, dst) -> None:
    """dst[...] = src for 2-D arrays of one shape (dst may be a row slice of a larger array)."""
    n = src.shape[0]
    if n not in _ROW_NUMBERS:   # uploaded once (an upload cannot be part of a CUDA graph's capture)
        _ROW_NUMBERS[n] = cuda.to_device(np.arange(n))
    gather_rows_kernel[_flat_launch(src.size)](src, _ROW_NUMBERS[n], dst)


def round_to_f16(x):
    """A copy of x rounded to half precision (q meets f16 keys so)."""
    shape = tuple(x.shape)
    k = shape[len(shape) - 1]
    out = empty(shape, np.float32)
    round_rows_kernel[_flat_launch(x.size)](x.reshape(x.size // k, k), out.reshape(x.size // k, k), False)
    return out


def gather_rows(x, rows: np.ndarray):
    d_rows = cuda.to_device(np.ascontiguousarray(rows, np.int64))
    out = empty((len(rows), x.shape[1]), np.float32)
    gather_rows_kernel[_flat_launch(len(rows) * x.shape[1])](x, d_rows, out)
    return out
