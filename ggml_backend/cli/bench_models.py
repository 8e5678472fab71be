"""Synthetic Llama-shaped model files for speed measurements (``ggml-backend bench --scaling``, benchmarks/).

The weights are random, written block by block with valid float16 scales sized so that every layer's outputs
keep a standard deviation near 1 (the logits stay finite, so both engines do the work of a real model). Speed
depends only on shapes and types, so such files measure what a real 1B or 7B model would cost without downloading
one. Quantized blocks come from one pool of random bytes read at random offsets (generating gigabytes of fresh
random numbers would take minutes); only the scales are drawn per block.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats import write_ggml, write_gguf
from ..quant.types import get_type

_POOL_BYTES = 1 << 24
_CHUNK_BLOCKS_BYTES = 1 << 22          # about 4 MB of blocks per chunk handed to the writer


@dataclass(frozen=True)
class LlamaShape:
    name: str
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# TinyLlama-1.1B's and LLaMA-7B's / LLaMA-13B's shapes; "tiny" for tests.
SHAPES = {
    "tiny": LlamaShape("tiny", n_embd=256, n_layer=2, n_ff=768, n_head=8, n_head_kv=4, n_vocab=4096),
    "1b": LlamaShape("1b", n_embd=2048, n_layer=22, n_ff=5632, n_head=32, n_head_kv=4),
    "7b": LlamaShape("7b", n_embd=4096, n_layer=32, n_ff=11008, n_head=32, n_head_kv=32),
    "13b": LlamaShape("13b", n_embd=5120, n_layer=40, n_ff=13824, n_head=40, n_head_kv=40),
}
# llama.cpp's LLAMA_FTYPE of a file that is "mostly" this type
_FILE_TYPES = {"q4_0": 2, "q8_0": 7, "q3_K": 11}
WEIGHT_TYPES = tuple(_FILE_TYPES)     # the types a synthetic model's matrices can have
# Where the half-float scale of each type lives in its block, and the standard deviation of a uniformly random
# quant times its sub-block scale (q4_0: nibble-8; q8_0: int8; q6_K: 6-bit minus 32 times an int8 sub-block scale;
# q3_K: 3-bit minus 4 times a 6-bit scale minus 32, sqrt(5.5 * 341.5)).
_SCALE_OFFSET = {"q4_0": 0, "q8_0": 0, "q6_K": 208, "q3_K": 108}
_RANDOM_QUANT_STD = {"q4_0": 4.6, "q8_0": 74.0, "q6_K": 18.5 * 74.0, "q3_K": 43.3}


def tensor_layout(shape: LlamaShape, weight_type: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, type, numpy shape) of every tensor, in llama.cpp's order. The output matrix is q6_K for a q4_0
    file and q8_0 for a q8_0 one, as llama.cpp's quantizer chooses."""
    e, kv = shape.n_embd, shape.head_dim * shape.n_head_kv
    output_type = "q8_0" if weight_type == "q8_0" else "q6_K"
    tensors = [("token_embd.weight", weight_type, (shape.n_vocab, e)),
               ("output_norm.weight", "f32", (e,)),
               ("output.weight", output_type, (shape.n_vocab, e))]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", "f32", (e,)),
                    (p + "attn_q.weight", weight_type, (e, e)),
                    (p + "attn_k.weight", weight_type, (kv, e)),
                    (p + "attn_v.weight", weight_type, (kv, e)),
                    (p + "attn_output.weight", weight_type, (e, e)),
                    (p + "ffn_norm.weight", "f32", (e,)),
                    (p + "ffn_gate.weight", weight_type, (shape.n_ff, e)),
                    (p + "ffn_up.weight", weight_type, (shape.n_ff, e)),
                    (p + "ffn_down.weight", weight_type, (e, shape.n_ff))]
    return tensors


def file_size_estimate(shape: LlamaShape, weight_type: str) -> int:
    total = 0
    for _, type_name, dims in tensor_layout(shape, weight_type):
        row = get_type(type_name)
        total += math.prod(dims) // row.block_size * row.type_size
    return total


def random_tensor_data(type_name: str, dims: tuple[int, ...], seed: int):
    """A callable returning an iterator of byte chunks: random blocks of ``type_name`` with scales that give a
    product with this matrix an output standard deviation near 1 (norm weights: ones)."""
    if type_name == "f32":
        return lambda: iter([np.ones(dims, np.float32)])
    row = get_type(type_name)
    n_in = dims[-1]
    total_blocks = math.prod(dims) // row.block_size
    scale = 1.0 / (_RANDOM_QUANT_STD[type_name] * math.sqrt(n_in))
    offset = _SCALE_OFFSET[type_name]

    def chunks():
        rng = np.random.default_rng(seed)
        pool = rng.integers(0, 256, _POOL_BYTES, dtype=np.uint8)
        per_chunk = max(1, _CHUNK_BLOCKS_BYTES // row.type_size)
        done = 0
        while done < total_blocks:
            n = min(per_chunk, total_blocks - done)
            start = int(rng.integers(0, _POOL_BYTES - n * row.type_size + 1)) if n * row.type_size <= _POOL_BYTES \
                else 0
            if n * row.type_size <= _POOL_BYTES:
                blocks = pool[start:start + n * row.type_size].copy().reshape(n, row.type_size)
            else:
                blocks = np.resize(pool, n * row.type_size).reshape(n, row.type_size)
            scales = (scale * rng.uniform(0.5, 1.5, n)).astype(np.float16)
            blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n, 2)
            yield blocks
            done += n
    return chunks


def spm_vocab(n_vocab: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A SentencePiece-like vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then dummy pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types = np.ones(n_vocab, np.int32)
    types[0], types[1:3], types[3:259] = 2, 3, 6
    scores = -np.arange(n_vocab, dtype=np.float32)
    return tokens, scores, types


def write_synthetic_gguf(path, shape: LlamaShape, weight_type: str, *, progress: bool = False,
                         n_ctx_train: int = 2048) -> Path:
    """Write a random-weight Llama GGUF of ``shape`` whose matrices are ``weight_type`` (q4_0, q8_0 or q3_K)."""
    if weight_type not in _FILE_TYPES:
        raise ValueError(f"synthetic models are {', '.join(_FILE_TYPES)}, not {weight_type!r}")
    tokens, scores, types = spm_vocab(shape.n_vocab)
    metadata = {
        "general.architecture": "llama", "general.name": f"synthetic-llama-{shape.name}-{weight_type}",
        "general.file_type": _FILE_TYPES[weight_type], "general.quantization_version": 2,
        "llama.context_length": n_ctx_train, "llama.embedding_length": shape.n_embd,
        "llama.block_count": shape.n_layer, "llama.feed_forward_length": shape.n_ff,
        "llama.rope.dimension_count": shape.head_dim, "llama.attention.head_count": shape.n_head,
        "llama.attention.head_count_kv": shape.n_head_kv, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    tensors = [(name, type_name, dims, random_tensor_data(type_name, dims, seed))
               for seed, (name, type_name, dims) in enumerate(tensor_layout(shape, weight_type))]
    _write_atomically(path, lambda tmp: write_gguf(tmp, metadata, tensors, progress=progress))
    return Path(path)


def write_synthetic_ggml(path, shape: LlamaShape, weight_type: str = "q4_0", *, progress: bool = False) -> Path:
    """The same model as a legacy GGML ggjt v3 file (GGML-era vocabulary: raw byte tokens, plain spaces)."""
    if shape.n_head_kv != shape.n_head:
        raise ValueError("GGML files of the ggjt era hold no grouped-query attention shapes")
    vocab = [("", 0.0), ("", 0.0), ("", 0.0)] + [(bytes([b]), 0.0) for b in range(256)]
    vocab += [(f" t{i}", -float(i)) for i in range(shape.n_vocab - len(vocab))]
    # ggjt's n_mult: the value llama.cpp used for this n_ff (n_ff = n_mult * ceil(8/3 * n_embd / n_mult))
    n_mult = next(m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)
                  if m * -(-(2 * (4 * shape.n_embd) // 3) // m) == shape.n_ff)
    hparams = {"n_embd": shape.n_embd, "n_mult": n_mult, "n_head": shape.n_head, "n_layer": shape.n_layer,
               "n_rot": shape.head_dim, "ftype": _FILE_TYPES[weight_type]}
    tensors = [(name, type_name, dims, random_tensor_data(type_name, dims, seed))
               for seed, (name, type_name, dims) in enumerate(tensor_layout(shape, weight_type))]
    _write_atomically(path, lambda tmp: write_ggml(tmp, hparams, vocab, tensors, progress=progress))
    return Path(path)


def _write_atomically(path, write) -> None:
    # a run interrupted half-way must not leave a truncated file that a later run would reuse
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def bench_models_dir() -> Path:
    return Path(os.environ.get("GGML_BACKEND_BENCH_DIR", Path.home() / ".cache" / "ggml_backend" / "bench"))


def synthetic_model(shape_name: str, weight_type: str, directory=None, *, progress: bool = False) -> Path:
    """The path of the synthetic GGUF file, written first when it is not there yet."""
    shape = SHAPES[shape_name]
    path = Path(directory or bench_models_dir()) / f"synthetic-llama-{shape_name}-{weight_type}.gguf"
    if not path.is_file() or path.stat().st_size < file_size_estimate(shape, weight_type):
        write_synthetic_gguf(path, shape, weight_type, progress=progress)
    return path


# --- shape clones: a real model's tensors (names, types, shapes) and metadata, with random weights ---------------
# For measuring a real model's speed where its file cannot go (the GPU machine is offline and takes 64 MiB per
# call): the header (metadata, tokenizer included, and the tensor list) is a few MB; the weights are drawn there.

_CLONE_TENSORS_KEY = "ggml_backend.shape_clone.tensors"   # the source's tensor list, as JSON, in the header file


def write_shape_header(source, dest) -> Path:
    """A GGUF file holding ``source``'s metadata and no tensors, its tensor list (name, type, numpy shape) stored as
    JSON under one more key: what ``write_shape_clone`` needs."""
    import json
    from ..formats import load
    model = load(str(source))
    if model.format != "gguf":
        raise ValueError(f"{source}: shape headers are made from GGUF files, not {model.format}")
    tensors = [(name, t.type.name, list(t.shape)) for name, t in model.tensors.items()]
    metadata = dict(model.metadata)
    metadata[_CLONE_TENSORS_KEY] = json.dumps(tensors)
    types = dict(model.metadata_types)
    types.pop("general.alignment", None)
    _write_atomically(dest, lambda tmp: write_gguf(tmp, metadata, [], model.alignment, value_types=types))
    return Path(dest)


def _random_blocks_of(type_name: str, dims: tuple[int, ...], seed: int):
    """Like random_tensor_data, for any type: blocks quantized by the type's own from_float from Gaussian values of
    standard deviation 1/sqrt(n_in) (so a product's outputs keep a standard deviation near 1), drawn from a pool
    of such blocks at random offsets. 1-D tensors (norms, biases) are ones."""
    if len(dims) == 1:
        return lambda: iter([np.ones(dims, np.float32).view(np.uint8) if type_name == "f32"
                             else get_type(type_name).from_float(np.ones(dims, np.float32))])
    row = get_type(type_name)
    total_blocks = math.prod(dims) // row.block_size
    pool_blocks = max(1, min(total_blocks, (1 << 22) // row.type_size))

    def chunks():
        rng = np.random.default_rng(seed)
        values = rng.standard_normal(pool_blocks * row.block_size, dtype=np.float32) / np.float32(math.sqrt(dims[-1]))
        pool = np.asarray(row.from_float(values), np.uint8).reshape(pool_blocks, row.type_size)
        done = 0
        while done < total_blocks:
            n = min(pool_blocks, total_blocks - done)
            start = int(rng.integers(0, pool_blocks - n + 1))
            yield pool[start:start + n]
            done += n
    return chunks


def write_shape_clone(header, dest, *, progress: bool = False) -> Path:
    """A GGUF file with ``header``'s metadata (from write_shape_header) and tensors of its names, types and shapes,
    filled with random blocks: the same work per token as the real model (not its outputs)."""
    import json
    from ..formats import load
    model = load(str(header))
    if _CLONE_TENSORS_KEY not in model.metadata:
        raise ValueError(f"{header}: not a shape header (no {_CLONE_TENSORS_KEY})")
    metadata = dict(model.metadata)
    listed = json.loads(metadata.pop(_CLONE_TENSORS_KEY))
    types = {k: v for k, v in model.metadata_types.items() if k in metadata and k != "general.alignment"}
    metadata["general.name"] = f"{metadata.get('general.name', 'model')} (shape clone, random weights)"
    tensors = [(name, type_name, tuple(dims), _random_blocks_of(type_name, tuple(dims), seed))
               for seed, (name, type_name, dims) in enumerate(listed)]
    _write_atomically(dest, lambda tmp: write_gguf(tmp, metadata, tensors, model.alignment, value_types=types,
                                                   progress=progress))
    return Path(dest)
