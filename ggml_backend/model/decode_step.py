"""A decode step's layers, each in one compiled call (llama and qwen2 layers; a few tokens of one or more sequences:
a plain decode step, continuous batching's, a speculative verification, a short prompt).

A token through Qwen2.5-Coder-0.5B's 24 layers made about 500 Python-level operations (norms, activation
quantizers, the launch plans of ``matmul_many``, bias adds, rope, cache stores, attention, SwiGLU, residual adds),
each a few microseconds of dispatch and argument checks around a microsecond of work: 7-10 ms of a 33 ms step on a
2-core Zen 3 (py-spy; the weight products' kernels themselves, ~25 ms, run at llama.cpp's speed per core). Here
one compiled function (``decode_layer``) runs a whole layer, calling the kernels the Python path calls
(``_rms_norm_row``, ``_q8_0_row`` / ``_q8_K_row``, ``decode.matvec`` / ``matvec_here`` for one token and
``matmul_few`` for several, ``_rotate``, ``_write_half_tokens``, ``_attention_many_kernel``, ``_swiglu_row``) in the
same order, so every number is the Python path's bit for bit (tests/test_decode_step.py compares logits and caches
exactly, for every block type, one sequence and several). On that Zen 3 a step took 27.8 instead of 37.7-39.2 ms.

What it takes: layers whose weights are all block types with SIMD kernels (``decode.KINDS``) or plain floats
(f32 / f16 / bf16 on ``float_dot.py``'s kernels) in one byte array (the model file's memory map), f32 or f16
caches, SiLU feed-forward without Gemma's extra norms, passes of a few tokens (of one sequence or several) that
the Python path would not give to the BLAS path or the integer GEMM.
Anything else (a generic CPU, q8_0 caches, Gemma, GPU offload, longer prompts) takes the Python path, as does
everything with ``GGML_BACKEND_DECODE_STEP=python``. One token on several threads runs all its layers in one
parallel launch (``decode_token_region``; a layer that cannot join it, in one launch of its own:
``decode_layer_region``) instead of one per product and attention (``GGML_BACKEND_DECODE_STEP=fused``).
Several tokens of one sequence (a speculative verification): 2-core Zen 4, Qwen2.5-0.5B, alternating in one
process: 2 tokens 24.3 against 28.6 ms on the Python path, 3 tokens 30.9 against 34.9, 4 tokens 38.4 against 42.6
(one token: 15-17 ms).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numba
import numpy as np
from numba import carray, cfunc, njit, prange, types
from numba.core.errors import TypingError
from numba.extending import overload

from ..quant.activations import _q8_0_row, _q8_K_row, _round_to_f16
from ..quant.float_dot import activation_pairs, float_rows, rounded_activations, rows_product
from ..quant.decode import (KIND_ARGS, ConstantType, KernelConstant, _chunk_rows, _constant_reader, _one_token_rows,
                            kind_code, matmul_few, matvec, matvec_chunk, matvec_here, one_token_operands)
from ..quant.matmul import BLAS_MIN_TOKENS, HERE_MAX_BYTES, KERNEL_ISA, _exact_gemm, _launch_plan
from .attention import (
    SequencesAttention, _attention_many_kernel, _pointer_at, attention_tile, decode_tile_width, head_tile_count,
    tile_width_of,
)
from .claims import call_worker, claim, count_done, read_counter, wait_for
from .forward import _rms_norm_row, _swiglu_row, _swiglu_value
from .kv_cache import _write_half_tokens
from .rope import _rotate, rope_cos_sin

_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_I64 = np.empty(0, np.int64)


@njit(nogil=True, cache=True)
def _quantized(kind, x):
    """The rows of x (float32 [n, k]) quantized to the kind's vec_dot_type as ``matmul.quantize_activations``
    gives them: (quants int8 [n, k], scales, q8_1's sums (q4_1, q5_1), q8_K's sums per 16 (K-quants)), the sums a
    kind does not read empty, one row per token."""
    n, k = x.shape
    qs = np.empty((n, k), np.int8)
    if kind_code(kind) >= 5:    # the K-quants: q8_K activations
        d = np.empty((n, k // 256), np.float32)
        bsums = np.empty((n, k // 16), np.int32)
        for t in range(n):
            _q8_K_row(x, t, qs, d, bsums)
        return qs, d, np.empty((n, 0), np.float32), bsums
    d = np.empty((n, k // 32), np.float32)
    sums = np.empty((n, k // 32), np.float32)
    for t in range(n):
        _q8_0_row(x, t, qs, d, sums)
    if kind_code(kind) == 1 or kind_code(kind) == 3:    # q4_1, q5_1: q8_1's sums
        return qs, d, sums, np.empty((n, 0), np.int32)
    return qs, d, np.empty((n, 0), np.float32), np.empty((n, 0), np.int32)


class PassRows(KernelConstant):
    """Whether a pass carries one token (``ONE_TOKEN``) or several, of one or more sequences (``SEVERAL``), as a
    compile-time constant: each compiled ``decode_layer`` holds only its own product code (``matvec`` or
    ``matmul_few`` and their kernels), which halved the time a process takes to load it from numba's cache
    (two layer kinds of Qwen2.5-0.5B: 235 ms at the first decode step, with both)."""

    label = "pass_rows"


ONE_TOKEN = PassRows(1, "one token")
SEVERAL = PassRows(2, "several tokens")
ONE_TOKEN_CODE = ONE_TOKEN.code
#: a ``PassRows``' code, a constant of the compiled function
pass_rows = _constant_reader(PassRows.label)


def _products_into(rows, group, w, x, n_threads, isa, into):
    """A group (kind, starts, counts, row_bytes, first) of matrices sharing the rows x (float32 [n, k]), their
    results written to into[:, first:] (the matrices are in the order of their places there: q | k | v,
    gate | up); a group without matrices (an unused slot) does nothing. ``ONE_TOKEN``: ``matvec`` writes into
    their place directly. ``SEVERAL``: ``matmul_few``, as ``matmul._simd_matvec`` runs it, then a copy."""
    raise NotImplementedError("decode_step._products_into runs inside compiled code only")


def _one_token_products(rows, group, w, x, n_threads, isa, into):
    # matmul._simd_matvec's choice for one token: the calling thread for small matrices, else all threads
    kind, starts, counts, row_bytes, first = group
    n = counts.sum()
    if n:
        out = into[0, first:first + n]
        xq, x_scale, x_sums, x_bsums = _quantized(kind, x)
        if n * row_bytes <= HERE_MAX_BYTES:
            matvec_here(kind, w, starts, counts, row_bytes, xq[0], x_scale[0], x_sums[0], x_bsums[0], out, isa)
        else:
            matvec(kind, w, starts, counts, row_bytes, xq[0], x_scale[0], x_sums[0], x_bsums[0], out,
                   max(1, min(n, 4 * n_threads)), isa)


def _several_products(rows, group, w, x, n_threads, isa, into):
    kind, starts, counts, row_bytes, first = group
    n = counts.sum()
    if n:
        xq, x_scale, x_sums, x_bsums = _quantized(kind, x)
        out = np.empty((x.shape[0], n), np.float32)
        matmul_few(kind, w, starts, counts, row_bytes, xq, x_scale, x_sums, x_bsums, out,
                   max(1, min(n, 4 * n_threads)), isa)
        into[:, first:first + n] = out


# The overload's implementation is the function above itself: each further jitted level between decode_layer and
# the kernels (a wrapper, a one-token helper) cost 1-2 s of compile time per block kind on this VM, a third of
# the 26-30 s the first decode step of Qwen2.5-0.5B compiled. (Inlining them all at numba's level instead made
# that 113 s.)
@overload(_products_into)
def _products_into_of(rows, group, w, x, n_threads, isa, into):
    if not isinstance(rows, ConstantType) or rows.label != PassRows.label:
        return None
    if _float_group(group):
        return _float_products
    return _one_token_products if rows.code == ONE_TOKEN.code else _several_products


# --- the plain float types (f32 / f16 / bf16) -------------------------------------------------------------------
#
# A group's kind is a ``decode.Kind`` constant for the block types and the ``float_dot.FLOAT_KINDS`` code (an int)
# for the plain floats; the functions below that take a group pick the float kernels (``float_dot.float_rows``, the
# kernels ``matmul`` runs for them) by that type at compile time. The activations are rounded to the weights'
# precision as ``matmul.quantize_activations`` rounds them, so the numbers are the Python path's. Qwen2.5-Coder-0.5B
# as F16 on the Python path spent 4.2-4.5 ms of a 36 ms two-thread token around the products (97 launches); here
# 0.7 ms outside the layers and the output product. Best step of 48 on two Zen 4 threads, alternating processes,
# Python path / here / llama.cpp: 35.5 / 33.0 / 32.9 ms, 36.3 / 33.6 / 33.6, 37.2 / 35.1 / 33.1.

def _float_group(group) -> bool:
    """Whether a group's numba type is that of a plain float group (its kind an integer), at typing time."""
    return isinstance(group, types.BaseTuple) and isinstance(group.types[0], types.Integer)


def _wide(isa):
    """Whether the kernel path has 512-bit registers (``Isa.wide``), as a compile-time constant."""
    raise NotImplementedError("decode_step._wide runs inside compiled code only")


@overload(_wide)
def _wide_of(isa):
    wide = bool(isa.wide)
    return lambda isa: wide


@njit(nogil=True, cache=True)
def _rounded_with_pairs(kind, x):
    """The rows x rounded to a float kind's precision and their ``activation_pairs`` (bf16's pairs, f16's halves,
    empty for f32): what the float kernels read besides the weights."""
    rounded = rounded_activations(kind, x)
    return rounded, activation_pairs(kind, rounded)


def _float_products(rows, group, w, x, n_threads, isa, into):
    # matmul's float launch: the calling thread for small matrices (as ``_one_token_products``), else all threads
    kind, starts, counts, row_bytes, first = group
    n = counts.sum()
    if n:
        rounded, pairs = _rounded_with_pairs(kind, x)
        if n * row_bytes <= HERE_MAX_BYTES:
            float_rows(kind, w, starts, counts, row_bytes, rounded, pairs, into, first, 0, n, _wide(isa))
        else:
            _float_launch(kind, w, starts, counts, row_bytes, rounded, pairs, into, first,
                          max(1, min(n, 4 * n_threads)), _wide(isa))


@njit(parallel=True, nogil=True, cache=True, error_model="numpy", boundscheck=False)
def _float_launch(kind, w, starts, counts, row_bytes, x, pairs, into, first, n_chunks, wide):
    """A float group's rows in ``n_chunks`` equal chunks, one parallel iteration each."""
    n = counts.sum()
    for chunk in prange(n_chunks):
        lo, hi = _chunk_rows(n, chunk, n_chunks)
        float_rows(kind, w, starts, counts, row_bytes, x, pairs, into, first, lo, hi, wide)


@njit(parallel=True, nogil=True, cache=True, error_model="numpy", boundscheck=False)
def _gate_up_swiglu(kind, w, starts, row_bytes, xq, x_scale, x_sums, x_bsums, gate_up, act, n_chunks, isa):
    """One token's gate and up products (matrices of one kind, ``act.size`` rows each, at byte ``starts[0]`` and
    ``starts[1]`` of ``w``; results into gate_up: gate | up) and their SwiGLU into ``act``, in one parallel launch:
    each chunk multiplies its rows of gate and of up (``matvec``'s row kernel), then takes their SwiGLU. After a
    ``matvec`` launch the SwiGLU ran on one thread: 0.24 ms of a two-thread decode step of Qwen2.5-0.5B (24 layers
    of 4,864 values). The same kernels and formula as the Python path, so the same numbers."""
    bias, min_sums, rows, scales, sums = one_token_operands(kind, xq, x_scale, x_sums, x_bsums, gate_up, isa)
    for chunk in prange(n_chunks):
        _gate_up_chunk(kind, w, starts, row_bytes, xq, scales, sums, min_sums, bias, rows, gate_up, act, chunk,
                       n_chunks, isa)


@njit(inline="always", cache=True, error_model="numpy")
def _gate_up_chunk(kind, w, starts, row_bytes, xq, scales, sums, min_sums, bias, rows, gate_up, act, chunk, n_chunks,
                   isa):
    """Chunk ``chunk`` of ``n_chunks`` (equal) of one token's gate and up rows (``one_token_operands``: bias,
    min_sums, rows, scales, sums; rows writes gate_up: gate | up) and the SwiGLU of those rows into ``act`` (flat):
    ``_gate_up_swiglu``'s and the one-launch layer's."""
    n_ff = act.size
    first, last = _chunk_rows(n_ff, chunk, n_chunks)
    for m in range(2):
        _one_token_rows(kind, w, starts[m] + first * row_bytes, row_bytes, last - first, xq, xq.size, scales, sums,
                        min_sums, bias, rows, m * n_ff + first, isa)
    for i in range(first, last):
        act[i] = _swiglu_value(gate_up[i], gate_up[n_ff + i])


def _feed_forward_act(rows, groups, w, h, n_threads, isa, n_ff):
    """SwiGLU(gate, up) of the rows h (float32 [n, n_embd]) for a layer whose gate and up matrices are the two
    groups ``groups`` (``_products_into``'s): for one token on several threads, gate and up of one block kind too
    large for the calling thread alone, in one launch (``_gate_up_swiglu``); else the products, then the SwiGLU.
    Qwen2.5-0.5B's 24 gate and up pairs on two cores of an AVX2 Zen 4, alternating in one process (medians of
    40): 11.65 against 12.73 ms from cache, 11.88 against 12.50 from memory; one thread gained nothing (11.66
    against 11.34 ms in one run, 20.04 against 20.28 in another) and keeps the separate launch."""
    raise NotImplementedError("decode_step._feed_forward_act runs inside compiled code only")


@overload(_feed_forward_act)
def _feed_forward_act_of(rows, groups, w, h, n_threads, isa, n_ff):
    return _gate_up_of_floats if _float_group(groups[0]) else _gate_up_of_blocks


def _gate_up_of_floats(rows, groups, w, h, n_threads, isa, n_ff):
    return _separate_gate_up(rows, groups, w, h, n_threads, isa, n_ff)


def _gate_up_of_blocks(rows, groups, w, h, n_threads, isa, n_ff):
    kind, starts, counts, row_bytes, first = groups[0]
    if (pass_rows(rows) == ONE_TOKEN_CODE and n_threads > 1 and groups[1][1].size == 0 and counts.size == 2
            and counts.sum() * row_bytes > HERE_MAX_BYTES):
        xq, x_scale, x_sums, x_bsums = _quantized(kind, h)
        gate_up = np.empty(2 * n_ff, np.float32)
        act = np.empty((1, n_ff), np.float32)
        _gate_up_swiglu(kind, w, starts, row_bytes, xq[0], x_scale[0], x_sums[0], x_bsums[0], gate_up, act[0],
                        max(1, min(n_ff, 4 * n_threads)), isa)
        return act
    return _separate_gate_up(rows, groups, w, h, n_threads, isa, n_ff)


@njit(nogil=True, cache=True, error_model="numpy")
def _separate_gate_up(rows, groups, w, h, n_threads, isa, n_ff):
    """The gate and up products (``_products_into``), then their SwiGLU."""
    n = h.shape[0]
    gate_up = np.empty((n, 2 * n_ff), np.float32)
    _products_into(rows, groups[0], w, h, n_threads, isa, gate_up)
    _products_into(rows, groups[1], w, h, n_threads, isa, gate_up)
    act = np.empty((n, n_ff), np.float32)
    gate = np.ascontiguousarray(gate_up[:, :n_ff])
    up = np.ascontiguousarray(gate_up[:, n_ff:])
    for t in range(n):
        _swiglu_row(gate, up, act, t)
    return act


@njit(nogil=True, cache=True, error_model="numpy")
def _norm(x, weight, eps):
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, t)
    return out


@njit(nogil=True, cache=True)
def _add_bias(y, first, bias):
    for t in range(y.shape[0]):
        for i in range(bias.size):
            y[t, first + i] += bias[i]


@njit(nogil=True, cache=True)
def _store(at, capacity, like, half, layer_shape, il, sequence, positions, rows):
    """rows [n, n_head_kv, head_dim]: row t at positions[t] of layer il of sequence[t]'s cache tensor, whose data
    ([n_layer, n_head_kv, capacity[s], head_dim], f16 bits or f32, like ``like``) is at address at[s]
    (``SequencesAttention``'s addresses, s = sequence[t])."""
    n_layer, n_head_kv = layer_shape[0], layer_shape[1]
    head_dim = rows.shape[2]
    for t in range(rows.shape[0]):
        s = sequence[t]
        data = carray(_pointer_at(at[s]), (n_layer, n_head_kv, capacity[s], head_dim), like.dtype)
        if half:
            _write_half_tokens(data, il, positions[t], rows[t:t + 1])
        else:
            for h in range(n_head_kv):
                for i in range(head_dim):
                    data[il, h, positions[t], i] = rows[t, h, i]


@njit(nogil=True, cache=True, error_model="numpy")
def decode_layer(rows, x, w, n_threads, isa, eps, attn_norm, qkv_groups, biases, shape, cos, sin, rope_dims, neox,
                 caches, il, sequence, positions, window, scale, wo, ffn_norm, gate_up_groups, n_ff, down):
    """Layer ``il`` for n tokens (``rows``: ONE_TOKEN where n is 1, else SEVERAL; x: float32 [n, n_embd], token t
    at positions[t] of sequence sequence[t]), their keys and values stored in each sequence's cache before any
    row attends (a row reads its sequence's cache up to its own position), the new x returned. ``caches``,
    ``sequence``, ``positions``: ``SequencesAttention.kernel_arguments()``, every cache grown past its positions.
    The steps and kernels of ``Model._forward_many``'s loop, in its order."""
    n_head, n_head_kv, head_dim_k, head_dim_v = shape
    key_at, value_at, key_capacity, value_capacity, layer_shape, key_like, value_like, half_keys, half_values = caches
    n = x.shape[0]
    n_q = n_head * head_dim_k
    n_k = n_head_kv * head_dim_k
    # --- attention ---
    h = _norm(x, attn_norm, eps)
    qkv = np.empty((n, n_q + n_k + n_head_kv * head_dim_v), np.float32)
    _products_into(rows, qkv_groups[0], w, h, n_threads, isa, qkv)
    _products_into(rows, qkv_groups[1], w, h, n_threads, isa, qkv)
    _products_into(rows, qkv_groups[2], w, h, n_threads, isa, qkv)
    q_bias, k_bias, v_bias = biases
    _add_bias(qkv, 0, q_bias)
    _add_bias(qkv, n_q, k_bias)
    _add_bias(qkv, n_q + n_k, v_bias)
    q = np.ascontiguousarray(qkv[:, :n_q]).reshape(n, n_head, head_dim_k)
    k = np.ascontiguousarray(qkv[:, n_q:n_q + n_k]).reshape(n, n_head_kv, head_dim_k)
    v = np.ascontiguousarray(qkv[:, n_q + n_k:]).reshape(n, n_head_kv, head_dim_v)
    _rotate(q, cos, sin, rope_dims, neox)
    _rotate(k, cos, sin, rope_dims, neox)
    _store(key_at, key_capacity, key_like, half_keys, layer_shape, il, sequence, positions, k)
    _store(value_at, value_capacity, value_like, half_values, layer_shape, il, sequence, positions, v)
    if half_keys:            # ggml's f16 product converts q to f16
        _round_to_f16(q.reshape(-1))
    attn = np.empty((n, n_head, head_dim_v), np.float32)
    _attention_many_kernel(q, key_at, value_at, key_capacity, value_capacity, layer_shape, key_like, value_like, il,
                           sequence, positions, attn, n_head // n_head_kv, window, scale)
    attn_out = np.empty_like(x)
    _products_into(rows, wo, w, attn.reshape(n, n_head * head_dim_v), n_threads, isa, attn_out)
    x = x + attn_out
    # --- feed-forward ---
    h = _norm(x, ffn_norm, eps)
    act = _feed_forward_act(rows, gate_up_groups, w, h, n_threads, isa, n_ff)
    ffn_out = np.empty_like(x)
    _products_into(rows, down, w, act, n_threads, isa, ffn_out)
    return x + ffn_out


# --- one token on several threads: the whole layer in one parallel launch ---------------------------------------
#
# decode_layer launches each product and the attention on its own (five launches a layer), and the threads
# between them wait in the threading layer (tbb's idle worker sleeps): the small launches (q/k/v and o,
# 0.5-0.6 MB) ran at 1.1-1.4x on two threads instead of the big products' 1.7-1.8x. Here one launch
# runs the layer: each thread takes chunks of the products, the attention's heads, from shared counters
# (claims.py), phase by phase, and waits (spinning) for the phase's last chunk before reading its results; the
# norms and the activations' quantizing, which every thread of a phase needs, each thread computes for itself
# (the same numbers from the same inputs; the other would wait meanwhile anyway), and the cache stores are one
# task. Each result is computed by the same kernels in the same order as decode_layer's, so the same bits.
# Qwen2.5-0.5B on two cores of an AVX2 Zen 4 VM, alternating in one process (10 rounds of 64 steps): 46.0 -> 50.3
# tok/s (medians).

# the phases of a layer, in order; phase p's counters (``_claim_task``): one per thread, then its done count
_QKV, _STORE, _ATTENTION, _OUTPUT, _GATE_UP, _DOWN, _RESIDUAL = range(7)
_N_PHASES = 7


@njit(nogil=True, cache=True)
def _chunks_of(group, n_workers):
    """How many chunks a product group takes (``matvec``'s: one for a small group, the calling thread's)."""
    kind, starts, counts, row_bytes, first = group
    n = counts.sum()
    if n == 0:
        return 0
    if n * row_bytes <= HERE_MAX_BYTES:
        return 1
    return max(1, min(n, 4 * n_workers))


def _group_operands(group, x, out, isa):
    """What a group's chunks (``_group_chunk``) read besides the weights, for the activations x (float32 [1, k])
    and the group's place in ``out`` (one row): for a block kind, x quantized for it and its
    ``one_token_operands`` (xq, bias, min_sums, rows, scales, sums; of no values for an unused slot); for a
    float kind, x rounded to its precision, its ``activation_pairs`` and ``out``."""
    raise NotImplementedError("decode_step._group_operands runs inside compiled code only")


def _group_chunk(group, operands, w, chunk, n_chunks, isa):
    """Chunk ``chunk`` of ``n_chunks`` (equal) of a group's rows, from its ``_group_operands``."""
    raise NotImplementedError("decode_step._group_chunk runs inside compiled code only")


def _block_operands(group, x, out, isa):
    kind, starts, counts, row_bytes, first = group
    n = counts.sum()
    xq, x_scale, x_sums, x_bsums = _quantized(kind, x if n else np.ascontiguousarray(x[:, :0]))
    bias, min_sums, rows, scales, sums = one_token_operands(kind, xq[0], x_scale[0], x_sums[0], x_bsums[0],
                                                            out[0, first:first + n], isa)
    return xq[0], bias, min_sums, rows, scales, sums


def _float_operands(group, x, out, isa):
    rounded, pairs = _rounded_with_pairs(group[0], x)
    return rounded, pairs, out


def _block_chunk(group, operands, w, chunk, n_chunks, isa):
    kind, starts, counts, row_bytes, first = group
    xq, bias, min_sums, rows, scales, sums = operands
    matvec_chunk(kind, w, starts, counts, row_bytes, xq, scales, sums, min_sums, bias, rows, chunk, n_chunks, isa)


def _float_chunk(group, operands, w, chunk, n_chunks, isa):
    kind, starts, counts, row_bytes, first = group
    rounded, pairs, out = operands
    lo, hi = _chunk_rows(counts.sum(), chunk, n_chunks)
    float_rows(kind, w, starts, counts, row_bytes, rounded, pairs, out, first, lo, hi, False)


@overload(_group_operands)
def _group_operands_of(group, x, out, isa):
    return _float_operands if _float_group(group) else _block_operands


@overload(_group_chunk)
def _group_chunk_of(group, operands, w, chunk, n_chunks, isa):
    return _float_chunk if _float_group(group) else _block_chunk


def _gate_up_operands(kind, h, gate_up, isa):
    """What the gate-up phase's chunks (``_gate_up_task``) read besides the weights, for the rows h (float32
    [1, n_embd]) and the results' place ``gate_up`` (gate | up): ``_group_operands``' for the kind."""
    raise NotImplementedError("decode_step._gate_up_operands runs inside compiled code only")


def _gate_up_task(kind, w, starts, row_bytes, operands, gate_up, act, chunk, n_chunks, isa):
    """Chunk ``chunk`` of ``n_chunks`` (equal) of one token's gate and up rows (the matrices at bytes ``starts[0]``
    and ``starts[1]`` of ``w``) into ``gate_up``, and their SwiGLU into ``act`` (flat): ``_gate_up_chunk`` for a
    block kind; for a float kind its rows of gate, then of up (``float_dot.rows_product``), then the SwiGLU."""
    raise NotImplementedError("decode_step._gate_up_task runs inside compiled code only")


def _block_gate_up_operands(kind, h, gate_up, isa):
    xq, x_scale, x_sums, x_bsums = _quantized(kind, h)
    bias, min_sums, rows, scales, sums = one_token_operands(kind, xq[0], x_scale[0], x_sums[0], x_bsums[0], gate_up,
                                                            isa)
    return xq[0], scales, sums, min_sums, bias, rows


def _float_gate_up_operands(kind, h, gate_up, isa):
    return _rounded_with_pairs(kind, h)


def _block_gate_up_task(kind, w, starts, row_bytes, operands, gate_up, act, chunk, n_chunks, isa):
    xq, scales, sums, min_sums, bias, rows = operands
    _gate_up_chunk(kind, w, starts, row_bytes, xq, scales, sums, min_sums, bias, rows, gate_up, act, chunk, n_chunks,
                   isa)


def _float_gate_up_task(kind, w, starts, row_bytes, operands, gate_up, act, chunk, n_chunks, isa):
    rounded, pairs = operands
    n_ff = act.size
    first, last = _chunk_rows(n_ff, chunk, n_chunks)
    out = gate_up.reshape(1, 2 * n_ff)
    for m in range(2):
        rows_product(kind, w, starts[m] + first * row_bytes, row_bytes, last - first, rounded, pairs, out,
                     m * n_ff + first, False)
    for i in range(first, last):
        act[i] = _swiglu_value(gate_up[i], gate_up[n_ff + i])


@overload(_gate_up_operands)
def _gate_up_operands_of(kind, h, gate_up, isa):
    return _float_gate_up_operands if isinstance(kind, types.Integer) else _block_gate_up_operands


@overload(_gate_up_task)
def _gate_up_task_of(kind, w, starts, row_bytes, operands, gate_up, act, chunk, n_chunks, isa):
    return _float_gate_up_task if isinstance(kind, types.Integer) else _block_gate_up_task


@njit(nogil=True, cache=True)
def _owned(phase_tasks, owner, n_workers):
    """The tasks of a phase that thread ``owner`` takes first: its share, in one piece (a thread's chunks of a
    product are neighbours in memory, which the prefetchers keep up with; chunks handed out in turn from one
    counter made each thread's reads jump at every chunk, and the layer 7% slower than a launch per product)."""
    return owner * phase_tasks // n_workers, (owner + 1) * phase_tasks // n_workers


@njit(nogil=True, cache=True)
def _claim_task(counters, phase, n_tasks, me, n_workers):
    """The next task of ``phase`` for thread ``me``: its own share first, then what is left of the others' (from
    where their owners have got to); -1 when every task is taken. Counters: phase p's per thread at
    p (n_workers + 1) + thread, its done count after them."""
    base = phase * (n_workers + 1)
    for k in range(n_workers):
        owner = (me + k) % n_workers
        first, end = _owned(n_tasks[phase], owner, n_workers)
        if read_counter(counters, base + owner) < end - first:
            i = claim(counters, base + owner)
            if first + i < end:
                return first + i
    return -1


@njit(nogil=True, cache=True)
def _task_done(counters, phase, n_workers):
    count_done(counters, phase * (n_workers + 1) + n_workers)


@njit(nogil=True, cache=True)
def _product_chunks(counters, phase, n_tasks, me, n_workers, group, operands, w, isa):
    """Thread ``me``'s chunks of a phase made of one product group's rows (o, down)."""
    while True:
        i = _claim_task(counters, phase, n_tasks, me, n_workers)
        if i < 0:
            break
        _group_chunk(group, operands, w, i, n_tasks[phase], isa)
        _task_done(counters, phase, n_workers)


@njit(nogil=True, cache=True)
def _phase_open(counters, phase, n_tasks, n_workers):
    """Whether a phase still has tasks to claim (a thread that starts late skips the work of the phases before)."""
    base = phase * (n_workers + 1)
    for owner in range(n_workers):
        first, end = _owned(n_tasks[phase], owner, n_workers)
        if read_counter(counters, base + owner) < end - first:
            return True
    return False


@njit(nogil=True, cache=True)
def _phase_done(counters, phase, n_tasks, n_workers):
    wait_for(counters, phase * (n_workers + 1) + n_workers, n_tasks[phase])


# The launch's arrays reach its workers as rows of one int64 table, (address, first dimension, second dimension) each,
# in the order below, and the worker is a C function (``region_worker``, one per layer kind) that the launch calls by
# its address. numba's parallel launches take arrays and scalars, not tuples, and a launch whose body calls a
# compiled function links that function's kernels and optimizes them again, twice, as does each caller above it:
# with the worker called directly and its 50 arguments flattened, a layer kind took 19 s to compile (Zen 4), 5 of
# them the worker's own; called by address, the launch compiles once for every kind, in a fraction of a second.
(_T_X, _T_W, _T_INTS, _T_ATTN_NORM, _T_FFN_NORM, _T_Q_BIAS, _T_K_BIAS, _T_V_BIAS, _T_COS, _T_SIN, _T_STARTS0,
 _T_COUNTS0, _T_STARTS1, _T_COUNTS1, _T_STARTS2, _T_COUNTS2, _T_STARTS_O, _T_COUNTS_O, _T_STARTS_GU, _T_STARTS_DOWN,
 _T_COUNTS_DOWN, _T_KEY_AT, _T_VALUE_AT, _T_KEY_CAPACITY, _T_VALUE_CAPACITY, _T_SEQUENCE, _T_POSITIONS, _T_QKV,
 _T_ATTN, _T_ATTN_OUT, _T_GATE_UP, _T_ACT, _T_FFN_OUT, _T_COUNTERS, _T_N_TASKS, _T_CHUNKS, _T_X_NEXT) = range(37)
_N_SLOTS = 37
# the integers, in one array (the table's _INTS)
(_N_HEAD, _N_HEAD_KV, _HEAD_DIM_K, _HEAD_DIM_V, _N_LAYER, _ROPE_DIMS, _NEOX, _IL, _WINDOW, _HALF_KEYS,
 _HALF_VALUES, _Q0_BYTES, _Q0_FIRST, _Q1_BYTES, _Q1_FIRST, _Q2_BYTES, _Q2_FIRST, _O_BYTES, _GU_BYTES,
 _DOWN_BYTES) = range(20)


def _put(table, slot, array, dtype):
    """Row ``slot`` of a launch's table: the array's address and dimensions (the second 0 for a vector); the array
    must be C-contiguous and of ``dtype`` (the worker reads it so), which its compile checks."""
    raise NotImplementedError("decode_step._put runs inside compiled code only")


@overload(_put, inline="always")
def _put_of(table, slot, array, dtype):
    if not (isinstance(array, types.Array) and array.layout == "C" and array.ndim in (1, 2)
            and array.dtype == getattr(dtype, "dtype", None)):
        raise TypingError(f"the layer region's table takes C-contiguous vectors or matrices of {dtype}, got {array}")
    if array.ndim == 1:
        def put_vector(table, slot, array, dtype):
            table[3 * slot] = array.ctypes.data
            table[3 * slot + 1] = array.size
            table[3 * slot + 2] = 0
        return put_vector

    def put_matrix(table, slot, array, dtype):
        table[3 * slot] = array.ctypes.data
        table[3 * slot + 1] = array.shape[0]
        table[3 * slot + 2] = array.shape[1]
    return put_matrix


@njit(inline="always")
def _vector(table, slot, dtype):
    return carray(_pointer_at(table[3 * slot]), (table[3 * slot + 1],), dtype)


@njit(inline="always")
def _matrix(table, slot, dtype):
    return carray(_pointer_at(table[3 * slot]), (table[3 * slot + 1], table[3 * slot + 2]), dtype)


@njit(inline="always", nogil=True, error_model="numpy")
def _region_worker(me, n_workers, table, eps, scale, isa, kinds, key_like, value_like):
    """One thread's part of ``decode_layer_region``'s launch (see the comment above): every phase's chunks it
    claims, then the wait for the phase's last. ``kinds``: the block kinds of q, k, v, o, gate-up and down."""
    k0, k1, k2, k_o, k_gu, k_down = kinds
    f32, i64 = np.float32, np.int64
    x, w, ints = _matrix(table, _T_X, f32), _vector(table, _T_W, np.uint8), _vector(table, _T_INTS, i64)
    cos, sin = _matrix(table, _T_COS, f32), _matrix(table, _T_SIN, f32)
    sequence, positions = _vector(table, _T_SEQUENCE, i64), _vector(table, _T_POSITIONS, i64)
    key_at, value_at = _vector(table, _T_KEY_AT, i64), _vector(table, _T_VALUE_AT, i64)
    key_capacity, value_capacity = _vector(table, _T_KEY_CAPACITY, i64), _vector(table, _T_VALUE_CAPACITY, i64)
    qkv, attn_out, act = _matrix(table, _T_QKV, f32), _matrix(table, _T_ATTN_OUT, f32), _matrix(table, _T_ACT, f32)
    counters, n_tasks = _vector(table, _T_COUNTERS, i64), _vector(table, _T_N_TASKS, i64)
    chunks = _vector(table, _T_CHUNKS, i64)
    n_head, n_head_kv = ints[_N_HEAD], ints[_N_HEAD_KV]
    head_dim_k, head_dim_v = ints[_HEAD_DIM_K], ints[_HEAD_DIM_V]
    attn = _vector(table, _T_ATTN, f32).reshape(1, n_head, head_dim_v)
    layer_shape = (ints[_N_LAYER], n_head_kv, head_dim_k, head_dim_v)
    rope_dims, neox, il = ints[_ROPE_DIMS], ints[_NEOX] != 0, ints[_IL]
    window = ints[_WINDOW]
    half_keys, half_values = ints[_HALF_KEYS] != 0, ints[_HALF_VALUES] != 0
    n_q = n_head * head_dim_k
    n_k = n_head_kv * head_dim_k
    g0 = (k0, _vector(table, _T_STARTS0, i64), _vector(table, _T_COUNTS0, i64), ints[_Q0_BYTES], ints[_Q0_FIRST])
    g1 = (k1, _vector(table, _T_STARTS1, i64), _vector(table, _T_COUNTS1, i64), ints[_Q1_BYTES], ints[_Q1_FIRST])
    g2 = (k2, _vector(table, _T_STARTS2, i64), _vector(table, _T_COUNTS2, i64), ints[_Q2_BYTES], ints[_Q2_FIRST])
    wo = (k_o, _vector(table, _T_STARTS_O, i64), _vector(table, _T_COUNTS_O, i64), ints[_O_BYTES], 0)
    down = (k_down, _vector(table, _T_STARTS_DOWN, i64), _vector(table, _T_COUNTS_DOWN, i64), ints[_DOWN_BYTES], 0)
    # q, k, v
    if _phase_open(counters, _QKV, n_tasks, n_workers):
        h = _norm(x, _vector(table, _T_ATTN_NORM, f32), eps)
        ops0 = _group_operands(g0, h, qkv, isa)
        ops1 = _group_operands(g1, h, qkv, isa)
        ops2 = _group_operands(g2, h, qkv, isa)
        c0, c1, c2 = chunks[0], chunks[1], chunks[2]
        while True:
            i = _claim_task(counters, _QKV, n_tasks, me, n_workers)
            if i < 0:
                break
            if i < c0:
                _group_chunk(g0, ops0, w, i, c0, isa)
            elif i < c0 + c1:
                _group_chunk(g1, ops1, w, i - c0, c1, isa)
            else:
                _group_chunk(g2, ops2, w, i - c0 - c1, c2, isa)
            _task_done(counters, _QKV, n_workers)
    _phase_done(counters, _QKV, n_tasks, n_workers)
    # the new key and value into each sequence's cache (one task)
    if _phase_open(counters, _STORE, n_tasks, n_workers) and _claim_task(counters, _STORE, n_tasks, me,
                                                                      n_workers) == 0:
        k = qkv[:, n_q:n_q + n_k].copy()   # copies: the bias and rope go on this thread's own
        _add_bias(k, 0, _vector(table, _T_K_BIAS, f32))
        k = k.reshape(1, n_head_kv, head_dim_k)
        v = qkv[:, n_q + n_k:].copy()
        _add_bias(v, 0, _vector(table, _T_V_BIAS, f32))
        v = v.reshape(1, n_head_kv, head_dim_v)
        _rotate(k, cos, sin, rope_dims, neox)
        _store(key_at, key_capacity, key_like, half_keys, layer_shape, il, sequence, positions, k)
        _store(value_at, value_capacity, value_like, half_values, layer_shape, il, sequence, positions, v)
        _task_done(counters, _STORE, n_workers)
    _phase_done(counters, _STORE, n_tasks, n_workers)
    # attention, one tile of heads (up to four of one KV head) a task
    if _phase_open(counters, _ATTENTION, n_tasks, n_workers):
        q = qkv[:, :n_q].copy()
        _add_bias(q, 0, _vector(table, _T_Q_BIAS, f32))
        q = q.reshape(1, n_head, head_dim_k)
        _rotate(q, cos, sin, rope_dims, neox)
        if half_keys:
            _round_to_f16(q.reshape(-1))
        s = sequence[0]
        keys = carray(_pointer_at(key_at[s]), (layer_shape[0], n_head_kv, key_capacity[s], head_dim_k),
                      key_like.dtype)[il]
        values = carray(_pointer_at(value_at[s]), (layer_shape[0], n_head_kv, value_capacity[s], head_dim_v),
                        value_like.dtype)[il]
        group = n_head // n_head_kv
        width = tile_width_of(n_head_kv, group, n_tasks[_ATTENTION])
        while True:
            tile = _claim_task(counters, _ATTENTION, n_tasks, me, n_workers)
            if tile < 0:
                break
            attention_tile(q, 0, tile, width, keys, values, attn, positions[0], group, window, scale)
            _task_done(counters, _ATTENTION, n_workers)
    _phase_done(counters, _ATTENTION, n_tasks, n_workers)
    # the attention's output product
    if _phase_open(counters, _OUTPUT, n_tasks, n_workers):
        ops = _group_operands(wo, attn.reshape(1, n_head * head_dim_v), attn_out, isa)
        _product_chunks(counters, _OUTPUT, n_tasks, me, n_workers, wo, ops, w, isa)
    _phase_done(counters, _OUTPUT, n_tasks, n_workers)
    # gate and up, and their SwiGLU (``_gate_up_swiglu``'s chunks)
    if _phase_open(counters, _GATE_UP, n_tasks, n_workers):
        h = _norm(x + attn_out, _vector(table, _T_FFN_NORM, f32), eps)
        gate_up = _vector(table, _T_GATE_UP, f32)
        operands = _gate_up_operands(k_gu, h, gate_up, isa)
        while True:
            chunk = _claim_task(counters, _GATE_UP, n_tasks, me, n_workers)
            if chunk < 0:
                break
            _gate_up_task(k_gu, w, _vector(table, _T_STARTS_GU, i64), ints[_GU_BYTES], operands, gate_up, act[0],
                          chunk, n_tasks[_GATE_UP], isa)
            _task_done(counters, _GATE_UP, n_workers)
    _phase_done(counters, _GATE_UP, n_tasks, n_workers)
    # down
    if _phase_open(counters, _DOWN, n_tasks, n_workers):
        ops = _group_operands(down, act, _matrix(table, _T_FFN_OUT, f32), isa)
        _product_chunks(counters, _DOWN, n_tasks, me, n_workers, down, ops, w, isa)
    _phase_done(counters, _DOWN, n_tasks, n_workers)
    # the layer's new x (one task): decode_layer's (x + attn_out) + ffn_out
    if _phase_open(counters, _RESIDUAL, n_tasks, n_workers) and _claim_task(counters, _RESIDUAL, n_tasks, me,
                                                                         n_workers) == 0:
        x_next, ffn_out = _matrix(table, _T_X_NEXT, f32), _matrix(table, _T_FFN_OUT, f32)
        for i in range(x.shape[1]):
            x_next[0, i] = (x[0, i] + attn_out[0, i]) + ffn_out[0, i]
        _task_done(counters, _RESIDUAL, n_workers)
    _phase_done(counters, _RESIDUAL, n_tasks, n_workers)


_WORKER_SIGNATURE = types.void(types.int64, types.int64, types.CPointer(types.int64), types.float32, types.float32)
_workers = {}   # (kinds, isa, key dtype, value dtype) -> its compiled worker (kept: the launch calls its address)


def region_worker(kinds: tuple, isa, key_dtype, value_dtype) -> int:
    """The address of ``decode_layer_region``'s worker for layers of these block kinds (q, k, v, o, gate-up, down)
    and cache dtypes on this path: a C function (me, n_workers, table, eps, scale), compiled on first use (numba
    caches it on disk: its key covers the constants it closes over)."""
    key = (kinds, isa, np.dtype(key_dtype), np.dtype(value_dtype))
    worker = _workers.get(key)
    if worker is None:
        key_like, value_like = np.empty(0, key_dtype), np.empty(0, value_dtype)

        @cfunc(_WORKER_SIGNATURE, nogil=True, cache=True, error_model="numpy")
        def worker(me, n_workers, table, eps, scale):
            _region_worker(me, n_workers, carray(table, (3 * _N_SLOTS,)), eps, scale, isa, kinds, key_like,
                           value_like)
        # the first of two threads that compiled it at once: the other's is dropped before any launch calls it
        worker = _workers.setdefault(key, worker)
    return worker.address


@njit(parallel=True, nogil=True, cache=True)
def _region_launch(worker, n_workers, table, eps, scale):
    for me in prange(n_workers):   # an int64 index: the parfor's own is unsigned
        call_worker(worker, np.int64(me), n_workers, table, eps, scale)


@njit(nogil=True)
def _alive(*arrays):
    """Nothing: a use of the arrays after the launch (numba frees an array after its last use in a function, and the
    launch reads those of the table by address)."""
    return len(arrays)


@njit(nogil=True, cache=True)
def _static_slots(table, w, n_threads, attn_norm, qkv_groups, biases, shape, rope_dims, neox, n_layer, il, window,
                  half_keys, half_values, wo, ffn_norm, gate_up_groups, n_ff, down):
    """The rows of a layer's launch table that are the same for every token (weights, norms, biases, the
    products' row plans, the layer's integers and task counts); returns the arrays it made (ints, n_tasks,
    chunks), which must live as long as the table is launched."""
    n_head, n_head_kv, head_dim_k, head_dim_v = shape
    g0, g1, g2 = qkv_groups
    gu = gate_up_groups[0]
    chunks = np.array([_chunks_of(g0, n_threads), _chunks_of(g1, n_threads), _chunks_of(g2, n_threads)])
    group = n_head // n_head_kv
    attention_tasks = head_tile_count(n_head_kv, group, decode_tile_width(n_head_kv, group, n_threads))
    n_tasks = np.array([chunks.sum(), 1, attention_tasks, _chunks_of(wo, n_threads), max(1, min(n_ff, 4 * n_threads)),
                        _chunks_of(down, n_threads), 1])
    ints = np.array([n_head, n_head_kv, head_dim_k, head_dim_v, n_layer, rope_dims, int(neox), il, window,
                     int(half_keys), int(half_values), g0[3], g0[4], g1[3], g1[4], g2[3], g2[4], wo[3], gu[3],
                     down[3]], np.int64)
    q_bias, k_bias, v_bias = biases
    _put(table, _T_W, w, np.uint8)
    _put(table, _T_INTS, ints, np.int64)
    _put(table, _T_ATTN_NORM, attn_norm, np.float32)
    _put(table, _T_FFN_NORM, ffn_norm, np.float32)
    _put(table, _T_Q_BIAS, q_bias, np.float32)
    _put(table, _T_K_BIAS, k_bias, np.float32)
    _put(table, _T_V_BIAS, v_bias, np.float32)
    _put(table, _T_STARTS0, g0[1], np.int64)
    _put(table, _T_COUNTS0, g0[2], np.int64)
    _put(table, _T_STARTS1, g1[1], np.int64)
    _put(table, _T_COUNTS1, g1[2], np.int64)
    _put(table, _T_STARTS2, g2[1], np.int64)
    _put(table, _T_COUNTS2, g2[2], np.int64)
    _put(table, _T_STARTS_O, wo[1], np.int64)
    _put(table, _T_COUNTS_O, wo[2], np.int64)
    _put(table, _T_STARTS_GU, gu[1], np.int64)
    _put(table, _T_STARTS_DOWN, down[1], np.int64)
    _put(table, _T_COUNTS_DOWN, down[2], np.int64)
    _put(table, _T_N_TASKS, n_tasks, np.int64)
    _put(table, _T_CHUNKS, chunks, np.int64)
    return ints, n_tasks, chunks


@njit(inline="always", nogil=True)
def _token_slots(table, x, x_next, cos, sin, key_at, value_at, key_capacity, value_capacity, sequence, positions,
                 buffers, counters):
    """The rows of a layer's launch table that change from token to token: its input and output x, the rope
    tables, the caches, the token's place, the layer's work arrays (``_work_arrays``) and its counters (zeros)."""
    qkv, attn, attn_out, gate_up, act, ffn_out = buffers
    _put(table, _T_X, x, np.float32)
    _put(table, _T_X_NEXT, x_next, np.float32)
    _put(table, _T_COS, cos, np.float32)
    _put(table, _T_SIN, sin, np.float32)
    _put(table, _T_KEY_AT, key_at, np.int64)
    _put(table, _T_VALUE_AT, value_at, np.int64)
    _put(table, _T_KEY_CAPACITY, key_capacity, np.int64)
    _put(table, _T_VALUE_CAPACITY, value_capacity, np.int64)
    _put(table, _T_SEQUENCE, sequence, np.int64)
    _put(table, _T_POSITIONS, positions, np.int64)
    _put(table, _T_QKV, qkv, np.float32)
    _put(table, _T_ATTN, attn, np.float32)
    _put(table, _T_ATTN_OUT, attn_out, np.float32)
    _put(table, _T_GATE_UP, gate_up, np.float32)
    _put(table, _T_ACT, act, np.float32)
    _put(table, _T_FFN_OUT, ffn_out, np.float32)
    _put(table, _T_COUNTERS, counters, np.int64)


@njit(inline="always", nogil=True)
def _work_arrays(shape, n_embd, n_ff):
    """A layer's intermediate results in a launch: qkv, attn, attn_out, gate_up, act, ffn_out."""
    n_head, n_head_kv, head_dim_k, head_dim_v = shape
    return (np.empty((1, (n_head + n_head_kv) * head_dim_k + n_head_kv * head_dim_v), np.float32),
            np.empty(n_head * head_dim_v, np.float32), np.empty((1, n_embd), np.float32),
            np.empty(2 * n_ff, np.float32), np.empty((1, n_ff), np.float32), np.empty((1, n_embd), np.float32))


@njit(nogil=True, cache=True, error_model="numpy")
def decode_layer_region(x, w, n_threads, isa, eps, attn_norm, qkv_groups, biases, shape, cos, sin, rope_dims, neox,
                        caches, il, sequence, positions, window, scale, wo, ffn_norm, gate_up_groups, n_ff, down,
                        worker):
    """``decode_layer`` for one token on ``n_threads`` (> 1) threads in one parallel launch (see above), for layers
    whose gate and up are one group of two matrices (``_gate_up_swiglu``'s); the same new x, bit for bit.
    ``worker``: ``region_worker``'s address for the layer's kinds and caches."""
    key_at, value_at, key_capacity, value_capacity, layer_shape, key_like, value_like, half_keys, half_values = caches
    table = np.empty(3 * _N_SLOTS, np.int64)
    ints, n_tasks, chunks = _static_slots(table, w, n_threads, attn_norm, qkv_groups, biases, shape, rope_dims, neox,
                                          layer_shape[0], il, window, half_keys, half_values, wo, ffn_norm,
                                          gate_up_groups, n_ff, down)
    buffers = _work_arrays(shape, x.shape[1], n_ff)
    counters = np.zeros(_N_PHASES * (n_threads + 1), np.int64)
    x_next = np.empty_like(x)
    _token_slots(table, x, x_next, cos, sin, key_at, value_at, key_capacity, value_capacity, sequence, positions,
                 buffers, counters)
    _region_launch(worker, n_threads, table, eps, scale)
    _alive(buffers, counters, n_tasks, chunks, ints, table)
    return x_next


# The token's launch: decode_layer_region's 24 launches a token (Qwen2.5-0.5B) cost each a wake-up of the other
# thread and a return to Python between them (with the tables built and the work arrays allocated again): 0.4-0.6
# ms of a 15 ms step on two Zen 4 cores (cycle counters in the worker). Here the layers' tables are built once
# (``FusedDecode._token_plan``: only the rows that change from token to token are filled each step) and the
# workers go from one layer to the next within one launch; each layer's last phase (the residual) is the barrier
# between them. Two threads, alternating fresh processes: layers 9.2-9.5 against 10.0-10.5 ms a token (medians
# of 3 x 64 steps), 1-5% a step, inside the hour's drift of the machine.
@njit(parallel=True, nogil=True, cache=True)
def _token_launch(workers, tables, n_workers, eps, scale):
    for me in prange(n_workers):   # each thread through every layer; a layer's last phase waits for all of it
        for il in range(workers.size):
            call_worker(workers[il], np.int64(me), n_workers, tables[il], eps, scale)


@njit(nogil=True, cache=True, error_model="numpy")
def decode_token_region(x, static_tables, workers, n_threads, eps, scale, shape, n_ff, cos, sin, rope_of_layer,
                        key_at, value_at, key_capacity, value_capacity, sequence, positions):
    """Every layer of one token on ``n_threads`` (> 1) threads in one parallel launch: ``decode_layer_region``'s
    launches one after another in one, each layer's ``region_worker`` (``workers``, their addresses) on its table
    (``static_tables``' rows: ``_static_slots``), each layer's x its last phase's result. The layers share one set
    of work arrays (a thread reaches the next layer only after every task of this one is done, and a late thread
    writes only for tasks it claims, which it cannot claim in a finished layer). ``cos`` / ``sin``: the distinct
    rope tables, ``rope_of_layer`` the index of each layer's. Returns the new x, the same bits as the layers one
    launch each."""
    n_layer = workers.size
    tables = static_tables.copy()
    buffers = _work_arrays(shape, x.shape[1], n_ff)
    xs = np.empty((n_layer + 1, 1, x.shape[1]), np.float32)   # layer il's input xs[il], its result xs[il + 1]
    xs[0] = x
    counters = np.zeros((n_layer, _N_PHASES * (n_threads + 1)), np.int64)
    for il in range(n_layer):
        r = rope_of_layer[il]
        _token_slots(tables[il], xs[il], xs[il + 1], cos[r], sin[r], key_at, value_at, key_capacity, value_capacity,
                     sequence, positions, buffers, counters[il])
    _token_launch(workers, tables, n_threads, eps, scale)
    _alive(buffers, counters, tables, xs)
    return xs[n_layer].copy()


def _group_slots(matrices, n_slots):
    """The launch plan of matrices sharing an input as ``n_slots`` groups (kind: a ``decode.Kind`` or, for the plain
    floats, the ``FLOAT_KINDS`` code; starts, counts, row_bytes, first output row), unused slots empty, and the
    byte arrays they read; (None, None) where the fused step cannot take them: a float type on a CPU without the
    float kernels, or a group whose matrices are not neighbours in the output (q and v of one type, k of
    another)."""
    plan = _launch_plan(matrices)
    if plan.float_members or not plan.groups or len(plan.groups) > n_slots:
        return None, None
    firsts = np.concatenate([[0], np.cumsum([m.shape[0] for m in matrices])]).astype(np.int64)
    slots = []
    for group in plan.groups:
        if group.members != list(range(group.members[0], group.members[0] + len(group.members))):
            return None, None
        kind = group.float_kind if group.simd_kind is None else KIND_ARGS[group.simd_kind]
        slots.append((kind, group.starts, group.counts, group.row_bytes, int(firsts[group.members[0]])))
    while len(slots) < n_slots:   # an unused slot: no matrices (its kind only fixes the compiled types)
        slots.append((slots[0][0], _EMPTY_I64, _EMPTY_I64, 0, 0))
    roots = {(group.base.ctypes.data, group.base.nbytes) for group in plan.groups}
    return tuple(slots), (plan.groups[0].base, roots)


@dataclass
class _LayerArgs:
    """What ``decode_layer`` takes for one layer that does not change from token to token."""
    attn_norm: np.ndarray
    qkv_groups: tuple
    biases: tuple
    wo: tuple
    ffn_norm: np.ndarray
    gate_up_groups: tuple
    down: tuple
    rope: tuple      # (freq base, freq scale) of this layer
    window: int
    one_launch: bool  # whether one token on several threads takes decode_layer_region (gate and up one group)


class FusedDecode:
    """The layers of a model as ``decode_layer`` calls (see the module docstring); ``build`` gives None where the
    model cannot take them, ``takes`` says whether a forward pass can."""

    def __init__(self, hp, layers: list[_LayerArgs], weights: np.ndarray, products: set):
        self.hp = hp
        self.layers = layers
        self.weights = weights
        self._products = products   # (block kind, k) of every product: whether the exact GEMM would take it
        self._compiled = {}   # (layer, rows, f16 keys, f16 values, one launch) -> the compiled entry point
        self._workers = {}    # (layer, key dtype, value dtype) -> its region worker's address
        #: one token on several threads: each layer in one launch (decode_layer_region) where it can (the default,
        #: GGML_BACKEND_DECODE_STEP=region); False (``fused``): a launch per product (decode_layer)
        self.one_launch = decode_step_choice() == "region"
        #: and the whole token in one launch (decode_token_region) where every layer can take one
        self.token_launch = all(layer.one_launch for layer in layers)
        self._token_plans = {}   # (threads, cache layout) -> decode_token_region's static tables and workers
        self._token_entry = None  # decode_token_region's compiled entry point (looked up once, as _compiled's)

    @classmethod
    def build(cls, model):
        hp = model.hp
        arch = hp.arch
        if (KERNEL_ISA is None or arch.ffn_activation != "silu" or arch.qk_norm or arch.post_norms
                or arch.rope_mode not in ("normal", "neox") or hp.n_head % hp.n_head_kv):
            return None
        layers, roots, weights, products = [], set(), None, set()
        for il, layer in enumerate(model.layers):
            if any(lin.bias is not None for lin in (layer.wo, layer.w_gate, layer.w_up, layer.w_down)):
                return None
            groups = []
            for linears, n_slots in (((layer.wq, layer.wk, layer.wv), 3), ((layer.w_gate, layer.w_up), 2),
                                     ((layer.wo,), 1), ((layer.w_down,), 1)):
                slots, bases = _group_slots([lin.matrix for lin in linears], n_slots)
                if slots is None:
                    return None
                weights, base_roots = bases
                roots |= base_roots
                products |= {(slot[0].code, linears[0].n_in) for slot in slots if not isinstance(slot[0], int)}
                groups.append(slots)
            qkv, gate_up, (wo,), (down,) = groups
            biases = tuple(_EMPTY_F32 if lin.bias is None else np.ascontiguousarray(lin.bias, np.float32)
                           for lin in (layer.wq, layer.wk, layer.wv))
            _, _, gate_up_counts, gate_up_row_bytes, _ = gate_up[0]   # _feed_forward_act's one-launch rule
            one_launch = (gate_up[1][1].size == 0 and gate_up_counts.size == 2
                          and gate_up_counts.sum() * gate_up_row_bytes > HERE_MAX_BYTES)
            layers.append(_LayerArgs(np.ascontiguousarray(layer.attn_norm, np.float32), qkv, biases, wo,
                                     np.ascontiguousarray(layer.ffn_norm, np.float32), gate_up, down,
                                     model._rope_params(il), hp.sliding_window if hp.swa_layers[il] else 0,
                                     one_launch))
        if len(roots) != 1:   # every weight in one byte array: one ``w`` for every call
            return None
        return cls(hp, layers, weights, products)

    def takes(self, spans, n_tokens: int) -> bool:
        """Whether a forward pass of these sequences (``Model._forward_many``'s spans: first row, last row, cache,
        first position) runs here: not so many tokens that the Python path would take the BLAS path or the
        integer GEMM (AVX512-VNNI, from 8 tokens); caches the sequences' attention kernel reads (f32 or f16, the
        same kinds in all)."""
        if n_tokens >= BLAS_MIN_TOKENS:
            return False
        if any(_exact_gemm(kind, (n_tokens, k)) for kind, k in self._products):
            return False
        return SequencesAttention.readable([cache for _, _, cache, _ in spans])

    def run(self, x: np.ndarray, spans, positions: np.ndarray, sequences: SequencesAttention | None = None):
        """Every layer for the tokens of the sequences (x: their embeddings, float32 [n, n_embd]; rows
        first..last-1 of a span at its positions, its cache's); ``sequences``: the pass's ``SequencesAttention``
        if it made one. Returns the new x."""
        hp = self.hp
        caches = [cache for _, _, cache, _ in spans]
        if sequences is None:   # it grows each cache past its positions first
            sequences = SequencesAttention(caches, [last - first for first, last, _, _ in spans], positions)
        cache_args, sequence, positions = sequences.kernel_arguments()
        half_keys, half_values = cache_args[-2], cache_args[-1]
        shape = (hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v)
        eps = np.float32(hp.rms_eps)
        scale = np.float32(hp.attn_scale)
        neox = hp.arch.rope_mode == "neox"
        tables = {}
        n_threads = _n_threads()
        rows = ONE_TOKEN if len(x) == 1 else SEVERAL
        x = np.ascontiguousarray(x, np.float32)
        if self.one_launch and self.token_launch and rows is ONE_TOKEN and n_threads > 1:
            return self._token_region(x, n_threads, cache_args, sequence, positions, shape, eps, scale, neox)
        for il, layer in enumerate(self.layers):
            if layer.rope not in tables:
                tables[layer.rope] = rope_cos_sin(positions, hp.rope_dims, *layer.rope)
            cos, sin = tables[layer.rope]
            args = (x, self.weights, n_threads, KERNEL_ISA, eps, layer.attn_norm, layer.qkv_groups,
                    layer.biases, shape, cos, sin, hp.rope_dims, neox, cache_args, il, sequence, positions,
                    layer.window, scale, layer.wo, layer.ffn_norm, layer.gate_up_groups, hp.n_ff, layer.down)
            one_launch = self.one_launch and layer.one_launch and rows is ONE_TOKEN and n_threads > 1
            if one_launch:
                function = decode_layer_region
                args = args + (self._worker(il, cache_args[5].dtype, cache_args[6].dtype),)
            else:
                function = decode_layer
                args = (rows,) + args
            # numba's dispatcher types each argument before each call, and the tuples here (each a block kind
            # and arrays) took it 20 us an element: 90 us a group, ~0.6 ms a layer. The compiled function for
            # these argument types is looked up once (per layer and cache type) and then called directly.
            key = (il, rows.code, half_keys, half_values, one_launch)
            compiled = self._compiled.get(key)
            if compiled is None:
                x, self._compiled[key] = _first_call(function, args)
            else:
                x = compiled(*args)
        return x


    def _token_region(self, x, n_threads, cache_args, sequence, positions, shape, eps, scale, neox):
        """``run`` for one token on several threads: every layer in one launch (``decode_token_region``)."""
        hp = self.hp
        key_at, value_at, key_capacity, value_capacity, layer_shape, key_like, value_like = cache_args[:7]
        key = (n_threads, tuple(layer_shape), key_like.dtype, value_like.dtype)   # (f16 caches: uint16 dtypes)
        plan = self._token_plans.get(key)
        if plan is None:
            plan = self._token_plans[key] = self._token_plan(n_threads, cache_args, shape, neox)
        static_tables, workers, ropes, rope_of_layer, _ = plan
        cos_sin = [rope_cos_sin(positions, hp.rope_dims, *rope) for rope in ropes]
        cos = np.ascontiguousarray(np.stack([c for c, _ in cos_sin]), np.float32)
        sin = np.ascontiguousarray(np.stack([s for _, s in cos_sin]), np.float32)
        args = (x, static_tables, workers, n_threads, eps, scale, shape, hp.n_ff, cos, sin, rope_of_layer, key_at,
                value_at, key_capacity, value_capacity, sequence, positions)
        if self._token_entry is None:   # the dispatcher's typing skipped after the first call, as in ``run``
            x, self._token_entry = _first_call(decode_token_region, args)
            return x
        return self._token_entry(*args)

    def _token_plan(self, n_threads, cache_args, shape, neox):
        """What ``decode_token_region`` takes that is the same for every token: each layer's table with its static
        rows filled (``_static_slots``), the layers' worker addresses, the distinct rope parameters and each
        layer's index among them, and the arrays the tables point to (kept alive here)."""
        hp = self.hp
        layer_shape, key_like, value_like, half_keys, half_values = cache_args[4:]
        tables = np.zeros((len(self.layers), 3 * _N_SLOTS), np.int64)
        ropes = list(dict.fromkeys(layer.rope for layer in self.layers))
        kept = []
        for il, layer in enumerate(self.layers):
            kept.append(_static_slots(tables[il], self.weights, n_threads, layer.attn_norm, layer.qkv_groups,
                                      layer.biases, shape, hp.rope_dims, neox, layer_shape[0], il, layer.window,
                                      half_keys, half_values, layer.wo, layer.ffn_norm, layer.gate_up_groups,
                                      hp.n_ff, layer.down))
        workers = np.array([self._worker(il, key_like.dtype, value_like.dtype) for il in range(len(self.layers))],
                           np.int64)
        rope_of_layer = np.array([ropes.index(layer.rope) for layer in self.layers], np.int64)
        return tables, workers, ropes, rope_of_layer, kept

    def _worker(self, il: int, key_dtype, value_dtype) -> int:
        """``region_worker``'s address for layer ``il`` and these cache dtypes (looked up once)."""
        key = (il, key_dtype, value_dtype)
        address = self._workers.get(key)
        if address is None:
            layer = self.layers[il]
            kinds = tuple(group[0] for group in layer.qkv_groups) + (layer.wo[0], layer.gate_up_groups[0][0],
                                                                      layer.down[0])
            address = self._workers[key] = region_worker(kinds, KERNEL_ISA, key_dtype, value_dtype)
        return address


def _first_call(function, args):
    """Call the numba dispatcher ``function`` on ``args``; (its result, the compiled entry point for these argument
    types), which later calls with arguments of the same types can take without the dispatcher's typing."""
    result = function(*args)
    types = tuple(function.typeof_pyval(arg) for arg in args)
    return result, function.overloads[types].entry_point


def _n_threads() -> int:
    """The threads a pass's launches use: numba's, as ``session.set_threads`` set them (tests ask for more
    region workers than threads here)."""
    return numba.get_num_threads()


def decode_step_choice() -> str:
    """``GGML_BACKEND_DECODE_STEP``: ``region`` (the default) takes the compiled layers wherever the model allows it
    and runs the layers of one token on several threads in one launch (``decode_token_region``, or a launch a
    layer: ``decode_layer_region``); ``fused`` takes the
    compiled layers with a launch per product (``decode_layer``: 4-12% slower decode on two Zen 4 cores, measured
    alternating); ``python`` keeps every decode step on the Python path (for comparisons)."""
    choice = os.environ.get("GGML_BACKEND_DECODE_STEP", "region")
    if choice not in ("fused", "region", "python"):
        raise ValueError(f"GGML_BACKEND_DECODE_STEP must be 'region', 'fused' or 'python', got {choice!r}")
    return choice


def one_token_code(n_threads: int) -> str:
    """Which compiled code a one-token pass on ``n_threads`` threads runs (a layer of Qwen2.5-0.5B's shape):
    ``region``, ``fused`` or ``python`` (the compile helpers key their markers on it)."""
    choice = decode_step_choice()
    return "fused" if choice == "region" and n_threads < 2 else choice


def fused_decode_enabled() -> bool:
    """Whether decode steps take the compiled layers (``decode_step_choice`` other than ``python``)."""
    return decode_step_choice() != "python"
