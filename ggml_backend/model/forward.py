"""One forward pass for every supported architecture (llama, qwen2, gemma3).

The architecture's switches come from model/spec.py; the weights stay in their quantized blocks inside the memory
map and are multiplied there by quant/matmul.py. Everything else (norms, rope, attention, activations) works on
float32 activations, which are small next to the weights: numpy, or a small numba kernel where numpy's
temporaries cost a prompt several percent (rms_norm). A pass of a few tokens (decode, verification) runs each layer
below as one compiled call instead (model/decode_step.py: the same kernels in the same order, the same numbers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .._allocator import large_pass, reuse_freed_memory
from .._threading import TakeTurns
from ..quant import dequantize, dequantize_rows
from ..quant.blocks import HALF_TO_FLOAT
from ..quant.layouts import relaid_tensor
from ..quant.simd import exponent_plus, float_from_bits, fma_f32
from ..quant.matmul import BLAS_MIN_TOKENS, WeightMatrix, matmul_many, single_threaded_blas
from .attention import SequencesAttention, attention
from .batching import ForwardBatcher, batch_invariant, driver_greenlet
from .kv_cache import DEFAULT_CACHE_TYPE, KVCache
from .rope import apply_rope, rope_cos_sin
from .spec import HParams


@dataclass
class Linear:
    """A weight matrix [n_out, n_in] in its ggml block format, plus an optional float32 bias."""
    name: str
    qtype: object
    data: np.ndarray               # uint8 [n_out, row_bytes], a view into the model file
    n_out: int
    n_in: int
    bias: np.ndarray | None = None

    def __post_init__(self):
        self.matrix = WeightMatrix(self.qtype, self.data, (self.n_out, self.n_in))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return project(x, self)[0]


def project(x: np.ndarray, *linears: Linear) -> list[np.ndarray]:
    """x @ W.T (+ bias) for weights sharing the input x (q/k/v, gate/up): x is quantized once per vec_dot_type."""
    outputs = matmul_many([linear.matrix for linear in linears], x)
    for linear, y in zip(linears, outputs):
        if linear.bias is not None:
            y += linear.bias
    return outputs


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    w_down: Linear
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None


# Below this many rows rms_norm runs on the calling thread (a decode step: a parallel launch would cost more than
# the work).
_PARALLEL_ROWS = 8


@njit(inline="always", cache=True)
def _rms_norm_row(x, weight, eps, out, r):
    total = 0.0                                   # ggml_float: the squares in float64, summed in order
    for i in range(x.shape[1]):
        value = np.float64(x[r, i])
        total += value * value
    mean = np.float32(total / x.shape[1])
    scale = np.float32(1.0) / np.sqrt(mean + eps)
    for i in range(x.shape[1]):
        out[r, i] = (x[r, i] * scale) * weight[i]


@njit(parallel=True, nogil=True, cache=True)
def _rms_norm_parallel(x, weight, eps, out):
    for r in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, r)


@njit(nogil=True, cache=True)
def _rms_norm_serial(x, weight, eps, out):
    for r in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, r)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in ggml's order of operations: the sum of squares in
    float64 (ggml_float), the mean and 1/sqrt in float32, then x * scale, then * weight. (Squares rounded to
    float32 first moved Gemma's logits further from llama.cpp's: 0.52 against 0.29 on test_engine_real's case.)"""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    kernel = _rms_norm_parallel if rows.shape[0] >= _PARALLEL_ROWS else _rms_norm_serial
    kernel(rows, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


# e^x as ggml's CPU kernels compute it on AVX2 (and NEON, SSE2 with FMA: the same operations), from Arm's
# optimized routines: x = n ln2 + b with n an integer (rounded by adding 1.5 * 2^23), e^b by a polynomial of
# degree 5, then 2^n put in the exponent bits; |n| > 126 scales in two steps, |n| > 192 gives inf or 0. Within
# 1.45 ulp + 0.5 of e^x; llama.cpp's SwiGLU runs it, so the same operations keep our activations on its bits
# (numpy's exp, correctly rounded, moved some of them by an ulp; it was also 6x slower here: 12 us for
# Qwen's 4,864 values on a Zen 3). ggml's AVX-512 variant rounds its last step differently (by about an ulp).
_EXP_SHIFTER = np.float32(float.fromhex("0x1.8p23"))
_EXP_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_EXP_LN2_HIGH = np.float32(float.fromhex("0x1.62e4p-1"))
_EXP_LN2_LOW = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_EXP_C0 = np.float32(float.fromhex("0x1.ffffecp-1"))
_EXP_C1 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_EXP_C2 = np.float32(float.fromhex("0x1.555e66p-3"))
_EXP_C3 = np.float32(float.fromhex("0x1.573e2ep-5"))
_EXP_C4 = np.float32(float.fromhex("0x1.0e4020p-7"))


@njit(inline="always", cache=True, error_model="numpy")
def _exp_ggml(x):
    z = fma_f32(x, _EXP_LOG2E, _EXP_SHIFTER)
    n = z - _EXP_SHIFTER
    b = fma_f32(-n, _EXP_LN2_LOW, fma_f32(-n, _EXP_LN2_HIGH, x))          # x - n ln2, in two parts
    u = b * b
    j = fma_f32(fma_f32(fma_f32(_EXP_C4, b, _EXP_C3), u, fma_f32(_EXP_C2, b, _EXP_C1)), u, _EXP_C0 * b)
    k = exponent_plus(z, 0x3F800000)                                       # 2^n
    g = 0x82000000 if n <= np.float32(0.0) else 0                          # past 2^126: 2^n as s1 * s2
    s1 = float_from_bits(g + 0x7F000000)
    s2 = exponent_plus(z, -g)
    far = abs(n) > np.float32(126.0)
    # selects, not branches, so that LLVM vectorizes the loop (as ggml blends its lanes)
    return (s1 * s1 if abs(n) > np.float32(192.0) else fma_f32(s2, j, s2) * s1) if far else fma_f32(k, j, k)


@njit(inline="always", cache=True, error_model="numpy")
def _swiglu_value(gate, up):
    """SiLU(gate) * up for one value (ggml's formula, its expf)."""
    return (gate / (np.float32(1.0) + _exp_ggml(-gate))) * up


@njit(inline="always", cache=True, error_model="numpy")
def _swiglu_row(gate, up, out, r):
    for i in range(gate.shape[1]):
        out[r, i] = _swiglu_value(gate[r, i], up[r, i])


@njit(parallel=True, nogil=True, cache=True, error_model="numpy")   # numpy: no zero-division branch
def _swiglu_parallel(gate, up, out):
    for r in prange(gate.shape[0]):
        _swiglu_row(gate, up, out, r)


@njit(nogil=True, cache=True, error_model="numpy")
def _swiglu_serial(gate, up, out):
    for r in range(gate.shape[0]):
        _swiglu_row(gate, up, out, r)


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up with silu(x) = x / (1 + e^-x), as llama.cpp's SwiGLU computes it (e^-x by ggml's
    ``_exp_ggml`` above); both [n, n_ff] float32. ``out`` may be ``gate`` (in place). Each row's numbers are the
    same whether it is computed alone or with others (elementwise; the serial and parallel builds run one row
    function)."""
    if gate.shape != up.shape or gate.ndim != 2:
        raise ValueError(f"swiglu: gate {gate.shape} and up {up.shape} must be the same 2-D shape")
    gate = np.ascontiguousarray(gate, dtype=np.float32)
    up = np.ascontiguousarray(up, dtype=np.float32)
    out = np.empty_like(gate) if out is None else out
    kernel = _swiglu_parallel if gate.shape[0] >= _PARALLEL_ROWS else _swiglu_serial
    kernel(gate, up, out)
    return out


def _gelu_f32(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation, written as ggml writes it."""
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(
        np.float32(0.7978845608028654) * x * (np.float32(1.0) + np.float32(0.044715) * x * x)))


def _make_gelu_table() -> np.ndarray:
    every_half = HALF_TO_FLOAT   # all 65,536 halves as float32, indexed by bit pattern
    with np.errstate(all="ignore"):
        return _gelu_f32(every_half).astype(np.float16).astype(np.float32)


# ggml's CPU backend computes GELU through a table indexed by the input rounded to float16 (GGML_GELU_FP16),
# the output being float16 too; doing the same keeps Gemma's numbers on llama.cpp's.
_GELU_TABLE = _make_gelu_table()


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    y = _GELU_TABLE[x.astype(np.float16).view(np.uint16)]
    y[x <= -10.0] = 0.0
    big = x >= 10.0
    y[big] = x[big]
    return y


class Model:
    """Weights of one model file, arranged for the forward pass."""

    def __init__(self, model_file, hparams: HParams):
        reuse_freed_memory()   # a forward pass's temporaries from reused memory, not fresh pages (see _allocator)
        self.hp = hparams
        self.file = model_file
        self.turns = TakeTurns()
        tensors = model_file.tensors
        hp = hparams

        def vector(name):
            t = tensors[name]
            return dequantize(t.type, t.data, t.shape).reshape(-1).astype(np.float32)

        def linear(name, n_out, n_in, bias_name=None):
            if name not in tensors:
                raise ValueError(f"{model_file.path}: tensor {name} is missing")
            t = tensors[name]
            if tuple(t.shape) != (n_out, n_in):
                raise ValueError(f"{model_file.path}: tensor {name} has shape {tuple(t.shape)}, "
                                 f"expected {(n_out, n_in)}")
            t = relaid_tensor(tensors, name)    # in the layout this CPU runs fastest (quant/layouts.py)
            bias = vector(bias_name) if bias_name and bias_name in tensors else None
            return Linear(name, t.type, t.data.reshape(n_out, -1), n_out, n_in, bias)

        emb = tensors["token_embd.weight"]
        self.token_embd_type = emb.type
        self.token_embd = emb.data.reshape(emb.shape[0], -1)
        self.output_norm = vector("output_norm.weight")
        if "output.weight" in tensors:
            self.output = linear("output.weight", hp.n_vocab, hp.n_embd)
        else:  # tied embeddings (gemma3, small qwen2)
            self.output = Linear("token_embd.weight", emb.type, self.token_embd, hp.n_vocab, hp.n_embd)

        n_q = hp.n_head * hp.head_dim_k
        bias = hp.arch.qkv_bias
        self.layers = []
        for i in range(hp.n_layer):
            b = f"blk.{i}."
            self.layers.append(Layer(
                attn_norm=vector(b + "attn_norm.weight"),
                wq=linear(b + "attn_q.weight", n_q, hp.n_embd, b + "attn_q.bias" if bias else None),
                wk=linear(b + "attn_k.weight", hp.n_embd_k_gqa, hp.n_embd, b + "attn_k.bias" if bias else None),
                wv=linear(b + "attn_v.weight", hp.n_embd_v_gqa, hp.n_embd, b + "attn_v.bias" if bias else None),
                wo=linear(b + "attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v),
                ffn_norm=vector(b + "ffn_norm.weight"),
                w_gate=linear(b + "ffn_gate.weight", hp.n_ff, hp.n_embd),
                w_up=linear(b + "ffn_up.weight", hp.n_ff, hp.n_embd),
                w_down=linear(b + "ffn_down.weight", hp.n_embd, hp.n_ff),
                q_norm=vector(b + "attn_q_norm.weight") if hp.arch.qk_norm else None,
                k_norm=vector(b + "attn_k_norm.weight") if hp.arch.qk_norm else None,
                post_attn_norm=vector(b + "post_attention_norm.weight") if hp.arch.post_norms else None,
                post_ffn_norm=vector(b + "post_ffw_norm.weight") if hp.arch.post_norms else None,
            ))
        # the last layers on a GPU, set by ggml_backend.cuda.offload_model (n_gpu_layers); None: all on the CPU
        self.offload = None
        # contexts' few-token passes combined into one (model/batching.py), where that leaves the numbers alone
        self.batcher = ForwardBatcher(self, BLAS_MIN_TOKENS - 1) if batch_invariant(self) else None
        # a decode step's layers as one compiled call each (model/decode_step.py), where the model allows it
        from .decode_step import FusedDecode, fused_decode_enabled
        self.fused_decode = FusedDecode.build(self) if fused_decode_enabled() else None

    def new_cache(self, n_ctx: int, type_k: str = DEFAULT_CACHE_TYPE, type_v: str = DEFAULT_CACHE_TYPE,
                  capacity: int | None = None) -> KVCache:
        """A KV cache for up to n_ctx positions, allocated as it fills (``capacity``: positions to allocate now;
        default one chunk, see kv_cache.GROW_CHUNK)."""
        hp = self.hp
        if self.offload is not None:   # the offloaded layers' keys and values live on the GPU (allocated whole)
            return self.offload.new_cache(n_ctx, type_k, type_v)
        return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v, type_k, type_v, capacity)

    def _rope_params(self, layer_index: int):
        hp = self.hp
        if hp.swa_layers[layer_index]:
            return hp.rope_base_swa, 1.0
        return hp.rope_base, hp.rope_scale

    def forward(self, tokens, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens at positions cache.n_past ... and append their keys/values to the cache.

        Returns float32 logits [n_tokens, n_vocab] if all_logits, else [1, n_vocab] for the last token.
        Contexts sharing these weights (``Llama.new_context``) meet here: a few tokens (below BLAS_MIN_TOKENS) go
        through the batcher, which runs the waiting contexts' tokens in one pass (model/batching.py); a long
        prompt runs alone (a server slot's, between the other slots' steps: server/slot_driver.py). Either way the
        numbers are those of the context running alone."""
        self.check(tokens, cache)
        if self.batcher is not None and len(tokens) < BLAS_MIN_TOKENS:
            return self.batcher.forward(tokens, cache, all_logits)
        parked = driver_greenlet()
        if parked is not None:   # a server slot's: its driver runs it between the other slots' steps
            return parked.wait_for_pass("alone", self, [(tokens, cache)], all_logits)[0]
        with self.turns, single_threaded_blas():   # our own threads do the parallel work; see quant/matmul.py
            return self.forward_many([(tokens, cache)], all_logits)[0]

    def check(self, tokens, cache: KVCache) -> None:
        """ValueError unless ``tokens`` (at least one) fit ``cache`` after what it holds."""
        n_tokens = len(tokens)
        if n_tokens == 0:
            raise ValueError("no tokens to evaluate")
        if cache.n_past + n_tokens > cache.n_ctx:
            raise ValueError(f"{cache.n_past + n_tokens} tokens do not fit the context of {cache.n_ctx}")
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.hp.n_vocab:
            raise ValueError(f"token id out of range [0, {self.hp.n_vocab})")

    def forward_many(self, items, all_logits: bool = False, output: str = "logits") -> list[np.ndarray]:
        """The forward pass: ``items`` is [(tokens, cache), ...], each a sequence with its own KV cache (checked
        by the caller); their tokens go through the weights together, and each attends to its own cache. Returns
        each sequence's rows (its last token's, or all of them if all_logits): logits [n, n_vocab], or with
        ``output="hidden"`` the final hidden states after the output norm, before the output matrix [n, n_embd]
        (what llama.cpp calls ``result_norm`` and returns as embeddings). The caller holds ``turns``."""
        if output not in ("logits", "hidden"):
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        n_tokens = sum(len(seq_tokens) for seq_tokens, _ in items)
        with large_pass() if n_tokens >= BLAS_MIN_TOKENS else contextlib.nullcontext():
            return self._forward_many(items, all_logits, output)

    def _forward_many(self, items, all_logits: bool, output: str) -> list[np.ndarray]:
        hp = self.hp
        tokens = np.concatenate([np.asarray(t, dtype=np.int64) for t, _ in items])
        n_tokens = len(tokens)
        spans, first = [], 0               # each sequence's rows: first, last, its cache, its first position
        for seq_tokens, cache in items:
            spans.append((first, first + len(seq_tokens), cache, cache.n_past))
            first += len(seq_tokens)
        positions = np.concatenate([np.arange(start, start + last - first) for first, last, _, start in spans])
        rope_tables = {}
        caches = [cache for _, _, cache, _ in spans]
        sequences_attention = None
        if SequencesAttention.possible(caches):    # one attention launch per layer for all sequences
            sequences_attention = SequencesAttention(caches, [last - first for first, last, _, _ in spans],
                                                     positions)

        x = dequantize_rows(self.token_embd_type, self.token_embd, tokens)          # [n_tokens, n_embd]
        if hp.arch.embed_scale:
            x = x * np.float32(np.sqrt(hp.n_embd))

        n_cpu_layers = hp.n_layer if self.offload is None else self.offload.first_layer
        if self.fused_decode is not None and self.offload is None and self.fused_decode.takes(spans, n_tokens):
            x = self.fused_decode.run(x, spans, positions, sequences_attention)   # a few tokens: compiled layers
            n_cpu_layers = 0
        for il, layer in enumerate(self.layers[:n_cpu_layers]):
            # --- attention ---
            h = rms_norm(x, layer.attn_norm, hp.rms_eps)
            q, k, v = project(h, layer.wq, layer.wk, layer.wv)
            q = q.reshape(n_tokens, hp.n_head, hp.head_dim_k)
            k = k.reshape(n_tokens, hp.n_head_kv, hp.head_dim_k)
            v = v.reshape(n_tokens, hp.n_head_kv, hp.head_dim_v)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, hp.rms_eps)
                k = rms_norm(k, layer.k_norm, hp.rms_eps)
            rope = self._rope_params(il)
            if rope not in rope_tables:
                rope_tables[rope] = rope_cos_sin(positions, hp.rope_dims, *rope)
            cos, sin = rope_tables[rope]
            apply_rope(q, cos, sin, hp.rope_dims, hp.arch.rope_mode)
            apply_rope(k, cos, sin, hp.rope_dims, hp.arch.rope_mode)

            window = hp.sliding_window if hp.swa_layers[il] else 0
            for first, last, cache, start in spans:
                cache.store(il, start, k[first:last], v[first:last])
            if sequences_attention is not None:
                attn = sequences_attention(q, il, hp.n_head // hp.n_head_kv, window, hp.attn_scale)
                attn = attn.reshape(n_tokens, hp.n_head * hp.head_dim_v)
            else:
                attn = np.empty((n_tokens, hp.n_head * hp.head_dim_v), np.float32)
                for first, last, cache, start in spans:   # each sequence over its own keys and values
                    attn[first:last] = self._attention(q[first:last], cache, il, start, window)
            attn_out = layer.wo(attn)
            if layer.post_attn_norm is not None:
                attn_out = rms_norm(attn_out, layer.post_attn_norm, hp.rms_eps)
            x = x + attn_out

            # --- feed-forward ---
            h = rms_norm(x, layer.ffn_norm, hp.rms_eps)
            gate, up = project(h, layer.w_gate, layer.w_up)
            if hp.arch.ffn_activation == "silu":
                # A few tokens: into fresh memory (writing over gate, which the other threads wrote, took 52
                # instead of 22 us a decode step's layer: their cache lines must be taken back from the other
                # cores first). A prompt: over gate, one [n_tokens, n_ff] array fewer at the pass's peak.
                act = swiglu(gate, up, out=gate if n_tokens >= BLAS_MIN_TOKENS else None)
            else:
                act = gelu_tanh(gate)
                act *= up
            del gate, up          # a prompt's peak memory: the next layer's gate and up while these still live
            ffn_out = layer.w_down(act)
            del act
            if layer.post_ffn_norm is not None:
                ffn_out = rms_norm(ffn_out, layer.post_ffn_norm, hp.rms_eps)
            x = x + ffn_out

        if self.offload is not None:   # the other layers (and the output, if all are offloaded) on the GPU
            return self.offload.forward_rest(self, x, spans, positions, all_logits, output)
        for first, last, cache, start in spans:
            cache.n_past = start + last - first
        rows = np.arange(n_tokens) if all_logits else np.array([last - 1 for _, last, _, _ in spans])
        x = np.ascontiguousarray(rms_norm(x[rows], self.output_norm, hp.rms_eps), dtype=np.float32)
        out = x if output == "hidden" else self.output(x)
        if all_logits:
            return [out[first:last] for first, last, _, _ in spans]
        return [out[i:i + 1] for i in range(len(spans))]

    def _attention(self, q: np.ndarray, cache: KVCache, il: int, start: int, window: int) -> np.ndarray:
        """softmax(q k^T * scale + mask) v for queries q [n_tokens, n_head, hd] at positions start..., over the
        cached keys/values of layer ``il``; see model/attention.py."""
        hp = self.hp
        out = attention(q, cache.k.layer(il), cache.v.layer(il), start, hp.n_head // hp.n_head_kv, window,
                        hp.attn_scale)
        return out.reshape(q.shape[0], hp.n_head * hp.head_dim_v)

    def rerotate_keys(self, cache: KVCache, first: int, last: int, delta: int) -> None:
        """Rotate cached keys of positions first..last-1 by delta positions (after a context shift)."""
        if last <= first:
            return
        with self.turns:
            self._rerotate_keys(cache, first, last, delta)

    def _rerotate_keys(self, cache: KVCache, first: int, last: int, delta: int) -> None:
        hp = self.hp
        if self.offload is not None:   # the offloaded layers' keys are rotated in the host mirror, then uploaded
            cache.to_host()
        for il in range(hp.n_layer):
            cos, sin = rope_cos_sin(np.full(1, delta), hp.rope_dims, *self._rope_params(il))
            keys = np.ascontiguousarray(cache.k.read(il, first, last).transpose(1, 0, 2))   # [n, n_head_kv, hd]
            apply_rope(keys, cos, sin, hp.rope_dims, hp.arch.rope_mode)
            cache.k.write(il, first, np.ascontiguousarray(keys.transpose(1, 0, 2)))
        if self.offload is not None:
            cache.host_changed()
