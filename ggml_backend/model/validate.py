"""One validation pass over a loaded model file before the engine is built from it.

The readers (formats/) guarantee that a file is well formed: every tensor lies inside the file, every value has a
known type. Whether the file describes a model this engine can run is checked here, in one place, before anything
is allocated: the hyper-parameters' types and ranges, the tensor set (every tensor the architecture needs, with the
shape the hyper-parameters imply), the vocabulary against the embedding, and the memory that the context asks for.
A file that fails raises ``ModelFileError`` naming the key or tensor, its value and what was expected, instead of
a ``KeyError``, a ``ZeroDivisionError``, a numpy broadcast error in the first forward pass, or a 30 GiB allocation
from a four-byte change.
"""
from __future__ import annotations

import math
import numbers
import re

import numpy as np

from .._allocator import available_memory
from ..formats.errors import ModelFileError
from ..quant.matmul import SUPPORTED_TYPES
from .spec import ARCHITECTURES, HParams, resolve_hparams
from .kv_cache import DEFAULT_CACHE_TYPE, cache_bytes

# Ranges far beyond any real model (the largest have ~100k-dim FFNs, 262k-token vocabularies, 10M-token contexts)
# and far below what would overflow an index or exhaust memory before the memory check could speak.
MAX_EMBEDDING = 1 << 20
MAX_FEED_FORWARD = 1 << 22
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 14
MAX_BLOCKS = 1 << 12
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.")


def _number_kind(value) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"an array of {len(value)} values"
    return f"{value!r} ({type(value).__name__})"


class _Reader:
    """Typed, range-checked access to one architecture's metadata keys, failing with ModelFileError."""

    def __init__(self, model_file, prefix: str):
        self.path = model_file.path
        self.metadata = model_file.metadata
        self.prefix = prefix

    def fail(self, key: str, value, expected: str):
        raise ModelFileError(self.path, f"metadata {self.prefix}{key} = {_number_kind(value)}; expected {expected}")

    def integer(self, key: str, low: int, high: int, default=None, required: bool = False):
        full = self.prefix + key
        if full not in self.metadata:
            if required:
                raise ModelFileError(self.path, f"metadata {full} is missing; expected an integer from {low} to "
                                                f"{high}")
            return default
        value = self.metadata[full]
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
            self.fail(key, value, f"an integer from {low} to {high}")
        if not low <= int(value) <= high:
            self.fail(key, int(value), f"an integer from {low} to {high}")
        return int(value)

    def real(self, key: str, low: float, high: float, default=None, *, low_open: bool = True):
        full = self.prefix + key
        if full not in self.metadata:
            return default
        value = self.metadata[full]
        expected = f"a finite number {'>' if low_open else '>='} {low:g} and <= {high:g}"
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
            self.fail(key, value, expected)
        value = float(value)
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            self.fail(key, value, expected)
        return value


def build_hparams(model_file, *, rope_freq_base: float = 0.0, rope_freq_scale: float = 0.0) -> HParams:
    """Validate ``model_file``'s hyper-parameters and tensor set, then resolve its HParams.

    Raises ModelFileError for anything in the file, ValueError for the two user overrides."""
    path = model_file.path
    arch_name = model_file.metadata.get("general.architecture", "llama")
    if not isinstance(arch_name, str) or arch_name not in ARCHITECTURES:
        raise ModelFileError(path, f"metadata general.architecture = {arch_name!r}; expected one of "
                                   f"{', '.join(ARCHITECTURES)}")
    for name, value in (("rope_freq_base", rope_freq_base), ("rope_freq_scale", rope_freq_scale)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (0 = from the file), got {value!r}")
    arch = ARCHITECTURES[arch_name]
    meta = _Reader(model_file, arch_name + ".")
    tensors = model_file.tensors

    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelFileError(path, "tensor token_embd.weight is missing; every model needs its token embeddings")
    if len(embedding.shape) != 2:
        raise ModelFileError(path, f"tensor token_embd.weight has shape {tuple(embedding.shape)}; expected "
                                   "(n_vocab, n_embd)")
    n_vocab = int(embedding.shape[0])
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise ModelFileError(path, f"tensor token_embd.weight has {n_vocab} rows; expected 1 to {MAX_VOCAB} tokens")

    n_embd = meta.integer("embedding_length", 1, MAX_EMBEDDING, required=True)
    n_layer = meta.integer("block_count", 1, MAX_BLOCKS, required=True)
    blocks_in_file = 1 + max((int(m.group(1)) for m in map(_BLOCK_NAME.match, tensors) if m), default=-1)
    if n_layer > blocks_in_file:
        held = f"tensors for {blocks_in_file} blocks (blk.0 to blk.{blocks_in_file - 1})" if blocks_in_file \
            else "no block tensors (blk.N.*)"
        meta.fail("block_count", n_layer, f"at most the number of blocks in the file, which holds {held}")
    n_head = meta.integer("attention.head_count", 1, MAX_HEADS, required=True)
    n_head_kv = meta.integer("attention.head_count_kv", 1, n_head, default=n_head)
    if n_head % n_head_kv:
        meta.fail("attention.head_count_kv", n_head_kv, f"a divisor of attention.head_count = {n_head}")
    head_dim_k = meta.integer("attention.key_length", 1, MAX_HEAD_DIM)
    head_dim_v = meta.integer("attention.value_length", 1, MAX_HEAD_DIM)
    if head_dim_k is None or head_dim_v is None:
        if n_embd % n_head:
            meta.fail("attention.head_count", n_head, f"a divisor of embedding_length = {n_embd} (the file gives "
                                                      "no attention.key_length / value_length)")
        head_dim_k = head_dim_k or n_embd // n_head
        head_dim_v = head_dim_v or n_embd // n_head
    n_ff = meta.integer("feed_forward_length", 1, MAX_FEED_FORWARD)
    if n_ff is None:
        up = tensors.get("blk.0.ffn_up.weight")
        if up is None or len(up.shape) != 2:
            raise ModelFileError(path, f"metadata {meta.prefix}feed_forward_length is missing and tensor "
                                       "blk.0.ffn_up.weight does not give it")
        n_ff = int(up.shape[0])
    rope_dims = meta.integer("rope.dimension_count", 2, head_dim_k, default=head_dim_k)
    if rope_dims % 2:
        meta.fail("rope.dimension_count", rope_dims, f"an even number from 2 to the head size {head_dim_k}")
    meta.integer("context_length", 1, MAX_CONTEXT)
    meta.real("attention.layer_norm_rms_epsilon", 0.0, 1.0)
    meta.real("rope.freq_base", 1.0, 1e12)   # a base <= 1 turns the rotation angles into overflow
    meta.real("rope.scaling.factor", 0.0, 1e6, low_open=False)
    meta.integer("attention.sliding_window", 0, MAX_CONTEXT)
    scaling_type = model_file.metadata.get(meta.prefix + "rope.scaling.type", "none")
    if not isinstance(scaling_type, str):
        meta.fail("rope.scaling.type", scaling_type, "a string (none, linear, ...)")

    _check_tensors(model_file, arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=n_head_kv, head_dim_k=head_dim_k, head_dim_v=head_dim_v, n_ff=n_ff)
    vocab = model_file.vocab
    if vocab is not None and len(vocab) > n_vocab:
        raise ModelFileError(path, f"the vocabulary has {len(vocab)} tokens but token_embd.weight only {n_vocab} "
                                   "rows; every token needs an embedding")

    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return resolve_hparams(model_file.metadata, shapes, rope_freq_base=rope_freq_base,
                           rope_freq_scale=rope_freq_scale)


def _check_tensors(model_file, arch, *, n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim_k, head_dim_v,
                   n_ff) -> None:
    """Every tensor the forward pass reads exists, with the shape the hyper-parameters imply and a type the
    kernels handle; the shapes are what model/forward.py's Model asks for."""
    tensors = model_file.tensors
    path = model_file.path

    def check(name: str, shape: tuple, *, matrix: bool = False, optional: bool = False) -> None:
        t = tensors.get(name)
        if t is None:
            if optional:
                return
            raise ModelFileError(path, f"tensor {name} is missing; the {arch.name} architecture needs it, with "
                                       f"shape {shape}")
        if tuple(t.shape) != shape:
            raise ModelFileError(path, f"tensor {name} has shape {tuple(t.shape)}; the hyper-parameters imply "
                                       f"{shape}")
        if matrix and (t.type.file_type or t.type.name) not in SUPPORTED_TYPES:   # file_type: re-laid at load
            raise ModelFileError(path, f"tensor {name} has type {t.type.name}; matrices must be one of "
                                       f"{', '.join(SUPPORTED_TYPES)}")

    n_q, n_k, n_v = n_head * head_dim_k, n_head_kv * head_dim_k, n_head_kv * head_dim_v
    check("token_embd.weight", (n_vocab, n_embd), matrix=True)
    check("output_norm.weight", (n_embd,))
    check("output.weight", (n_vocab, n_embd), matrix=True, optional=True)
    for i in range(n_layer):
        b = f"blk.{i}."
        check(b + "attn_norm.weight", (n_embd,))
        check(b + "attn_q.weight", (n_q, n_embd), matrix=True)
        check(b + "attn_k.weight", (n_k, n_embd), matrix=True)
        check(b + "attn_v.weight", (n_v, n_embd), matrix=True)
        check(b + "attn_output.weight", (n_embd, n_head * head_dim_v), matrix=True)
        check(b + "ffn_norm.weight", (n_embd,))
        check(b + "ffn_gate.weight", (n_ff, n_embd), matrix=True)
        check(b + "ffn_up.weight", (n_ff, n_embd), matrix=True)
        check(b + "ffn_down.weight", (n_embd, n_ff), matrix=True)
        if arch.qkv_bias:
            check(b + "attn_q.bias", (n_q,), optional=True)
            check(b + "attn_k.bias", (n_k,), optional=True)
            check(b + "attn_v.bias", (n_v,), optional=True)
        if arch.qk_norm:
            check(b + "attn_q_norm.weight", (head_dim_k,))
            check(b + "attn_k_norm.weight", (head_dim_k,))
        if arch.post_norms:
            check(b + "post_attention_norm.weight", (n_embd,))
            check(b + "post_ffw_norm.weight", (n_embd,))


def build_tokenizer(model_file):
    """The tokenizer of ``model_file``; a vocabulary that cannot make one is the file's fault (ModelFileError)."""
    from ..tokenizer import Tokenizer
    from ..tokenizer.vocab import TokenizerError
    try:
        return Tokenizer.from_metadata(model_file.metadata, ggml_legacy=model_file.format == "ggml")
    except TokenizerError as exc:
        raise ModelFileError(model_file.path, f"vocabulary: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise ModelFileError(model_file.path, f"vocabulary: tokenizer metadata is malformed "
                                              f"({type(exc).__name__}: {exc})") from None


# ---- memory ---------------------------------------------------------------------------------------------------

def memory_needed(hp: HParams, n_ctx: int, n_batch: int, logits_all: bool,
                  cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE)) -> dict[str, int]:
    """Bytes the engine allocates beyond the memory-mapped weights, by what they are for."""
    f32 = 4
    per_layer_head = hp.n_layer * hp.n_head_kv * n_ctx
    needs = {
        # model/kv_cache.py: K and V per layer, [n_head_kv, n_ctx, head_dim], in their cache types
        "KV cache": (cache_bytes(cache_types[0], per_layer_head * hp.head_dim_k)
                     + cache_bytes(cache_types[1], per_layer_head * hp.head_dim_v)),
        # one prompt batch's activations: the FFN's gate/up/act, q/k/v and attention output, the residual, the
        # logits (attention scores are one row of n_ctx per thread at a time: model/attention.py)
        "activations": n_batch * (3 * hp.n_ff + 4 * hp.n_embd + hp.n_head * (hp.head_dim_k + hp.head_dim_v)
                                  + hp.n_vocab) * f32,
        "token ids": n_ctx * 9,
    }
    if logits_all:
        needs["logits of every position (logits_all)"] = n_ctx * hp.n_vocab * f32
    return needs


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n_bytes < 1024 or unit == "PiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} PiB"


def check_memory(hp: HParams, n_ctx: int, n_batch: int, logits_all: bool,
                 cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE), *,
                 context: str | None = None) -> None:
    """Refuse a context whose buffers would not fit in the memory available now (ValueError naming the context
    size and where it came from: ``context``, default "n_ctx=N")."""
    needs = memory_needed(hp, n_ctx, n_batch, logits_all, cache_types)
    total = sum(needs.values())
    available = available_memory()
    if available is not None and total > available:
        parts = ", ".join(f"{what} {_size(n)}" for what, n in needs.items() if n >= 1 << 20)
        raise ValueError(f"{context or f'n_ctx={n_ctx}'} needs {_size(total)} of memory ({parts}), more than the "
                         f"{_size(available)} available; use a smaller context size")
