"""A decode step's layer in one compiled call (llama and qwen2 layers, one token of one sequence).

A token through Qwen2.5-Coder-0.5B's 24 layers made about 500 Python-level operations (norms, activation
quantizers, the launch plans of ``matmul_many``, bias adds, rope, cache stores, attention, SwiGLU, residual adds),
each a few microseconds of dispatch and argument checks around a microsecond of work: 7-10 ms of a 33 ms step on a
2-core Zen 3 (py-spy; the weight products' kernels themselves, ~25 ms, are llama.cpp's speed per core). Here one
compiled function runs a whole layer, calling the same kernels the Python path calls (``_rms_norm_row``,
``_q8_0_row`` / ``_q8_K_row``, ``decode.matvec`` / ``matvec_here``, ``_rotate``, ``_write_half_tokens``,
``_attention_kernel``, ``_swiglu_row``) in the same order, so every number is the Python path's bit for bit
(tests/test_decode_step.py compares logits and caches exactly, for every block type).

What it takes: layers whose weights are all block types with SIMD kernels (``decode.KINDS``) in one byte array
(the model file's memory map), f32 or f16 caches, SiLU feed-forward without Gemma's extra norms. Anything else
(a generic CPU, q8_0 caches, Gemma, GPU offload, several tokens or sequences) takes the Python path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

from ..quant.activations import _q8_0_row, _q8_K_row, _round_to_f16
from ..quant.decode import KIND_ARGS, kind_code, matvec, matvec_here
from ..quant.matmul import HERE_MAX_BYTES, KERNEL_ISA, _launch_plan
from .attention import _attention_kernel
from .forward import _rms_norm_row, _swiglu_row
from .kv_cache import _write_half_tokens
from .rope import _rotate

_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_I64 = np.empty(0, np.int64)


@njit(nogil=True, cache=True)
def _product(kind, w, starts, counts, row_bytes, x, n_threads, isa, out):
    """out = x (float32 [1, k]) times the rows of a group of matrices of one block type at byte offsets
    ``starts`` of ``w`` (``counts`` rows each; out: float32 [sum(counts)]). Quantized to the type's vec_dot_type
    and multiplied as ``matmul._simd_matvec`` does for one token (the same kernels, the same choice of the calling
    thread or all of them)."""
    n = out.size
    k = x.shape[1]
    kc = kind_code(kind)
    if kc >= 5:    # the K-quants: q8_K activations
        qs = np.empty((1, k), np.int8)
        d = np.empty((1, k // 256), np.float32)
        bsums = np.empty((1, k // 16), np.int32)
        _q8_K_row(x, 0, qs, d, bsums)
        sums = np.empty(0, np.float32)
        block_sums = bsums[0]
    else:          # q8_0 (q8_1's sums for q4_1 / q5_1)
        qs = np.empty((1, k), np.int8)
        d = np.empty((1, k // 32), np.float32)
        s = np.empty((1, k // 32), np.float32)
        _q8_0_row(x, 0, qs, d, s)
        sums = s[0] if kc == 1 or kc == 3 else np.empty(0, np.float32)
        block_sums = np.empty(0, np.int32)
    if n * row_bytes <= HERE_MAX_BYTES:
        matvec_here(kind, w, starts, counts, row_bytes, qs[0], d[0], sums, block_sums, out, isa)
    else:
        matvec(kind, w, starts, counts, row_bytes, qs[0], d[0], sums, block_sums, out,
               max(1, min(n, 4 * n_threads)), isa)


@njit(nogil=True, cache=True, error_model="numpy")
def _norm(x, weight, eps):
    out = np.empty_like(x)
    _rms_norm_row(x, weight, eps, out, 0)
    return out


@njit(nogil=True, cache=True)
def _products_into(group, w, x, n_threads, isa, into):
    """A group (kind, starts, counts, row_bytes, first) of matrices sharing x, their rows written to
    into[first:] (the matrices are in the order of their places there: q | k | v, gate | up); a group without
    matrices (an unused slot) does nothing. The kernels write there directly: a copy of rows that the other
    threads wrote costs more than the copy (their cache lines come from the other cores)."""
    kind, starts, counts, row_bytes, first = group
    n = 0
    for c in counts:
        n += c
    if n:
        _product(kind, w, starts, counts, row_bytes, x, n_threads, isa, into[first:first + n])


@njit(nogil=True, cache=True)
def _add_bias(y, first, bias):
    for i in range(bias.size):
        y[first + i] += bias[i]


@njit(nogil=True, cache=True)
def _store(data, half, il, position, values):
    """values [1, n_head_kv, head_dim] at ``position`` of layer il of a cache's data (f16 bits or f32)."""
    if half:
        _write_half_tokens(data, il, position, values)
    else:
        for h in range(values.shape[1]):
            for i in range(values.shape[2]):
                data[il, h, position, i] = values[0, h, i]


@njit(nogil=True, cache=True, error_model="numpy")
def decode_layer(x, w, n_threads, isa, eps, attn_norm, qkv_groups, biases, shape, cos, sin, rope_dims, neox, keys, values,
                 half_keys, half_values, il, position, window, scale, wo, ffn_norm, gate_up_groups, n_ff, down):
    """Layer ``il`` for one token x (float32 [1, n_embd]) at ``position``: its keys and values stored in the
    caches' data ([n_layer, n_head_kv, capacity, head_dim], f16 bits or f32, grown past ``position``), the new x
    returned. The steps and kernels of ``Model._forward_many``'s loop, in its order."""
    n_head, n_head_kv, head_dim_k, head_dim_v = shape
    n_q = n_head * head_dim_k
    n_k = n_head_kv * head_dim_k
    n_v = n_head_kv * head_dim_v
    # --- attention ---
    h = _norm(x, attn_norm, eps)
    qkv = np.empty(n_q + n_k + n_v, np.float32)
    _products_into(qkv_groups[0], w, h, n_threads, isa, qkv)
    _products_into(qkv_groups[1], w, h, n_threads, isa, qkv)
    _products_into(qkv_groups[2], w, h, n_threads, isa, qkv)
    q_bias, k_bias, v_bias = biases
    _add_bias(qkv, 0, q_bias)
    _add_bias(qkv, n_q, k_bias)
    _add_bias(qkv, n_q + n_k, v_bias)
    q = qkv[:n_q].copy().reshape(1, n_head, head_dim_k)
    k = qkv[n_q:n_q + n_k].copy().reshape(1, n_head_kv, head_dim_k)
    v = qkv[n_q + n_k:].copy().reshape(1, n_head_kv, head_dim_v)
    _rotate(q, cos, sin, rope_dims, neox)
    _rotate(k, cos, sin, rope_dims, neox)
    _store(keys, half_keys, il, position, k)
    _store(values, half_values, il, position, v)
    if half_keys:            # ggml's f16 product converts q to f16
        _round_to_f16(q.reshape(-1))
    attn = np.empty((1, n_head, head_dim_v), np.float32)
    _attention_kernel(q, keys[il], values[il], attn, position, n_head // n_head_kv, window, scale)
    attn_out = np.empty(x.shape[1], np.float32)
    _products_into(wo, w, attn.reshape(1, n_head * head_dim_v), n_threads, isa, attn_out)
    x = x + attn_out.reshape(1, x.shape[1])
    # --- feed-forward ---
    h = _norm(x, ffn_norm, eps)
    gate_up = np.empty((2, n_ff), np.float32)
    _products_into(gate_up_groups[0], w, h, n_threads, isa, gate_up.reshape(-1))
    _products_into(gate_up_groups[1], w, h, n_threads, isa, gate_up.reshape(-1))
    act = np.empty((1, n_ff), np.float32)
    _swiglu_row(gate_up[0:1], gate_up[1:2], act, 0)
    ffn_out = np.empty(x.shape[1], np.float32)
    _products_into(down, w, act, n_threads, isa, ffn_out)
    return x + ffn_out.reshape(1, x.shape[1])


def _group_slots(matrices, n_slots):
    """The launch plan of matrices sharing an input as ``n_slots`` groups (kind, starts, counts, row_bytes,
    first output row), unused slots empty, and the byte arrays they read; (None, None) where the fused step
    cannot take them: a float type, or a group whose matrices are not neighbours in the output (q and v of one
    type, k of another)."""
    plan = _launch_plan(matrices)
    if plan.float_members or not plan.groups or len(plan.groups) > n_slots:
        return None, None
    firsts = np.concatenate([[0], np.cumsum([m.shape[0] for m in matrices])]).astype(np.int64)
    slots = []
    for group in plan.groups:
        if group.members != list(range(group.members[0], group.members[0] + len(group.members))):
            return None, None
        slots.append((KIND_ARGS[group.simd_kind], group.starts, group.counts, group.row_bytes,
                      int(firsts[group.members[0]])))
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


class FusedDecode:
    """The layers of a model as ``decode_layer`` calls (see the module docstring); ``build`` gives None where the
    model cannot take them."""

    def __init__(self, model, layers: list[_LayerArgs], weights: np.ndarray):
        self.model = model
        self.layers = layers
        self.weights = weights
        self._compiled = {}   # (layer, f16 keys, f16 values) -> decode_layer's compiled entry point

    @classmethod
    def build(cls, model):
        hp = model.hp
        arch = hp.arch
        if (KERNEL_ISA is None or arch.ffn_activation != "silu" or arch.qk_norm or arch.post_norms
                or arch.rope_mode not in ("normal", "neox") or hp.n_head % hp.n_head_kv):
            return None
        layers, roots, weights = [], set(), None
        for il, layer in enumerate(model.layers):
            linears = (layer.wq, layer.wk, layer.wv)
            qkv, qkv_root = _group_slots([lin.matrix for lin in linears], 3)
            gate_up, gate_up_root = _group_slots([layer.w_gate.matrix, layer.w_up.matrix], 2)
            wo, wo_root = _group_slots([layer.wo.matrix], 1)
            down, down_root = _group_slots([layer.w_down.matrix], 1)
            if qkv is None or gate_up is None or wo is None or down is None:
                return None
            if layer.wo.bias is not None or layer.w_gate.bias is not None or layer.w_up.bias is not None \
                    or layer.w_down.bias is not None:
                return None
            for base, base_roots in (qkv_root, gate_up_root, wo_root, down_root):
                roots |= base_roots
                weights = base
            biases = tuple(_EMPTY_F32 if lin.bias is None else np.ascontiguousarray(lin.bias, np.float32)
                           for lin in linears)
            layers.append(_LayerArgs(np.ascontiguousarray(layer.attn_norm, np.float32), qkv, biases, wo[0],
                                     np.ascontiguousarray(layer.ffn_norm, np.float32), gate_up, down[0],
                                     model._rope_params(il), hp.sliding_window if hp.swa_layers[il] else 0))
        if len(roots) != 1:   # every weight in one byte array: one ``w`` for every call
            return None
        return cls(model, layers, weights)

    @staticmethod
    def takes(cache) -> bool:
        """Whether this cache's storage is one ``decode_layer`` writes: f32 or f16, not rotated."""
        return all(t.kind in ("f32", "f16") and not t.rotated and t.data.flags.c_contiguous
                   for t in (cache.k, cache.v))

    def run(self, x: np.ndarray, cache, position: int, positions: np.ndarray) -> np.ndarray:
        """Every layer for the token whose embedding is x (float32 [1, n_embd]) at ``position`` of ``cache``."""
        from .rope import rope_cos_sin
        hp = self.model.hp
        cache.k.grow(position + 1)
        cache.v.grow(position + 1)
        keys, values = cache.k.data, cache.v.data
        half_keys, half_values = cache.k.kind == "f16", cache.v.kind == "f16"
        shape = (hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v)
        eps = np.float32(hp.rms_eps)
        scale = np.float32(hp.attn_scale)
        neox = hp.arch.rope_mode == "neox"
        tables = {}
        n_threads = numba.get_num_threads()
        x = np.ascontiguousarray(x, np.float32)
        for il, layer in enumerate(self.layers):
            if layer.rope not in tables:
                tables[layer.rope] = rope_cos_sin(positions, hp.rope_dims, *layer.rope)
            cos, sin = tables[layer.rope]
            args = (x, self.weights, n_threads, KERNEL_ISA, eps, layer.attn_norm, layer.qkv_groups, layer.biases,
                    shape, cos, sin, hp.rope_dims, neox, keys, values, half_keys, half_values, il, position,
                    layer.window, scale, layer.wo, layer.ffn_norm, layer.gate_up_groups, hp.n_ff, layer.down)
            # numba's dispatcher types each argument before each call, and the tuples here (each a block kind
            # and arrays) took it 20 us an element: 90 us a group, ~0.6 ms a layer. The compiled function for
            # these argument types is looked up once (per layer and cache type) and then called directly.
            key = (il, half_keys, half_values)
            compiled = self._compiled.get(key)
            if compiled is None:
                x = decode_layer(*args)
                types = tuple(decode_layer.typeof_pyval(arg) for arg in args)
                self._compiled[key] = decode_layer.overloads[types].entry_point
            else:
                x = compiled(*args)
        return x


def fused_decode_enabled() -> bool:
    """``GGML_BACKEND_DECODE_STEP=python`` keeps every decode step on the Python path (for comparisons); the
    default, ``fused``, takes ``decode_layer`` wherever the model allows it."""
    import os
    choice = os.environ.get("GGML_BACKEND_DECODE_STEP", "fused")
    if choice not in ("fused", "python"):
        raise ValueError(f"GGML_BACKEND_DECODE_STEP must be 'fused' or 'python', got {choice!r}")
    return choice == "fused"
