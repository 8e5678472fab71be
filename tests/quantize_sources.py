"""Unquantized (f16 / f32) Llama model files for the quantize tests, written deterministically by our own GGUF
writer, so that the suite carries only the sha256 sums of llama.cpp's quantizations of them
(``tests/data/quantize_mix.json``, remade by ``tests/make_quantize_mix.py``), not the files.

Values come from PCG64's raw 64-bit output (numpy keeps bit generators' streams fixed across versions, unlike the
distributions built on them), mapped to uniform floats scaled by 1/sqrt(row length) so that the models compute
finite, varied logits. Three models, each chosen to exercise different rules of llama.cpp's mixes:

* ``a``: f16, n_embd 256, 4 layers, 8 heads sharing 2 KV heads (grouped-query factor 4), n_ff 768, and the real
  4,096-piece SentencePiece vocabulary of the synthetic reference model (copied from
  ``tests/data/synthetic/tiny-llama-q4_0.gguf``), so it also generates text. Separate output matrix.
* ``b``: f32, n_embd 160 (not a multiple of 256: the K types fall back to 32-blocks), 12 layers (blk.10 sorts
  after blk.9), 5 heads sharing 1 KV head, n_ff 512 (ffn_down keeps the K types), tied embeddings (no
  output.weight: token_embd gets the output's type), a dummy 512-piece vocabulary.
* ``c``: f16, n_embd 40 (not even a multiple of 32: K types and legacy types fall back to f16), 2 layers.
* ``d``: a Falcon (fused attn_qkv, no gate, biases): Falcon's own rules (q8_0 output, ffn_down by layer).
* ``e``: a LLaMA of 8 experts (3-D ffn_*_exps tensors, a router kept f32): the 8-expert rules.
* ``f``: a LLaMA of 80 layers with grouped-query attention, tiny (n_embd 32): llama.cpp counts it as LLaMA-70B.

Tensors are written in the order of HF converters (token_embd first, q k v o per layer), not llama.cpp's sorted
order, so that the tests see the quantizer reorder them; ``general.file_type`` sits early in the metadata, so they
see it moved to the end.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ggml_backend.default_model import file_sha256 as sha256_file  # noqa: F401 - the tests take it from here
from ggml_backend.formats import load, write_gguf
from ggml_backend.formats.gguf import GGUFValueType

DATA = Path(__file__).parent / "data"
VOCAB_SOURCE = DATA / "synthetic" / "tiny-llama-q4_0.gguf"

SOURCES = {
    #      dtype   n_embd layers heads kv  n_ff  vocab tied
    "a": ("f16", 256, 4, 8, 2, 768, "real", False),
    "b": ("f32", 160, 12, 5, 1, 512, 512, True),
    "c": ("f16", 40, 2, 5, 5, 96, 512, False),
    "d": ("f16", 256, 4, 8, 1, 512, 512, False),
    "e": ("f16", 256, 2, 8, 8, 256, 512, False),
    "f": ("f16", 32, 80, 4, 1, 64, 300, False),
}
ARCHITECTURES = {"d": "falcon"}
N_EXPERT = {"e": 8}


def _uniform(seed: int, shape, scale: float) -> np.ndarray:
    raw = np.random.PCG64(seed).random_raw(int(np.prod(shape)))
    unit = (raw >> np.uint64(40)).astype(np.float64) / float(1 << 24)   # 24 random bits -> [0, 1)
    return ((unit * 2.0 - 1.0) * scale).astype(np.float32).reshape(shape)


def _vocab(kind) -> tuple[dict, dict]:
    if kind == "real":
        model = load(VOCAB_SOURCE)
        keys = [k for k in model.metadata if k.startswith("tokenizer.")]
        return {k: model.metadata[k] for k in keys}, {k: model.metadata_types[k] for k in keys}
    from ggml_backend.cli.bench_models import spm_vocab
    tokens, scores, types = spm_vocab(int(kind))
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    return metadata, {}


def tensor_layout(name: str) -> list[tuple[str, tuple]]:
    """(tensor name, numpy shape) of source ``name`` in the order they are written."""
    _, e, n_layer, n_head, n_kv, n_ff, vocab, tied = SOURCES[name]
    n_vocab = 4096 if vocab == "real" else int(vocab)
    kv = e // n_head * n_kv
    layout = [("token_embd.weight", (n_vocab, e)), ("output_norm.weight", (e,))]
    if not tied:
        layout.append(("output.weight", (n_vocab, e)))
    if ARCHITECTURES.get(name) == "falcon":
        layout.insert(2, ("output_norm.bias", (e,)))
        for i in range(n_layer):
            p = f"blk.{i}."
            layout += [(p + "attn_norm.weight", (e,)), (p + "attn_norm.bias", (e,)),
                       (p + "attn_qkv.weight", (e + 2 * kv, e)), (p + "attn_output.weight", (e, e)),
                       (p + "ffn_up.weight", (n_ff, e)), (p + "ffn_down.weight", (e, n_ff))]
        return layout
    n_expert = N_EXPERT.get(name)
    for i in range(n_layer):
        if n_expert:
            p = f"blk.{i}."
            layout += [(p + "attn_norm.weight", (e,)), (p + "attn_q.weight", (e, e)), (p + "attn_k.weight", (kv, e)),
                       (p + "attn_v.weight", (kv, e)), (p + "attn_output.weight", (e, e)),
                       (p + "ffn_norm.weight", (e,)), (p + "ffn_gate_inp.weight", (n_expert, e)),
                       (p + "ffn_gate_exps.weight", (n_expert, n_ff, e)), (p + "ffn_up_exps.weight", (n_expert, n_ff, e)),
                       (p + "ffn_down_exps.weight", (n_expert, e, n_ff))]
            continue
        p = f"blk.{i}."
        layout += [(p + "attn_norm.weight", (e,)), (p + "attn_q.weight", (e, e)), (p + "attn_k.weight", (kv, e)),
                   (p + "attn_v.weight", (kv, e)), (p + "attn_output.weight", (e, e)), (p + "ffn_norm.weight", (e,)),
                   (p + "ffn_gate.weight", (n_ff, e)), (p + "ffn_up.weight", (n_ff, e)),
                   (p + "ffn_down.weight", (e, n_ff))]
    return layout


def write_source(name: str, path) -> Path:
    """Write source model ``name`` ("a", "b" or "c") to ``path``."""
    dtype, e, n_layer, n_head, n_kv, n_ff, vocab, _ = SOURCES[name]
    vocab_metadata, vocab_types = _vocab(vocab)
    arch = ARCHITECTURES.get(name, "llama")
    eps_key = "attention.layer_norm_epsilon" if arch == "falcon" else "attention.layer_norm_rms_epsilon"
    metadata = {
        "general.architecture": arch, "general.name": f"quantize-test-{name}",
        "general.file_type": 1 if dtype == "f16" else 0,
        f"{arch}.context_length": 2048, f"{arch}.embedding_length": e, f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff, f"{arch}.rope.dimension_count": e // n_head,
        f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_kv,
        f"{arch}.{eps_key}": 1e-5, f"{arch}.rope.freq_base": 10000.0,
    }
    if name in N_EXPERT:
        metadata.update({"llama.expert_count": N_EXPERT[name], "llama.expert_used_count": 2})
    metadata.update(vocab_metadata)
    value_types = {f"{arch}.{eps_key}": GGUFValueType.FLOAT32, **vocab_types}
    tensors = []
    for seed, (tensor_name, shape) in enumerate(tensor_layout(name)):
        if len(shape) == 1:   # norms: f32 near 1, as every converter writes them
            values = 1.0 + _uniform(1000 + seed, shape, 0.1)
            tensors.append((tensor_name, "f32", shape, values))
        else:
            scale = 1.0 if tensor_name == "token_embd.weight" else (3.0 / shape[-1]) ** 0.5
            values = _uniform(seed, shape, scale)
            tensors.append((tensor_name, dtype, shape, values.astype(np.float16 if dtype == "f16" else np.float32)))
    write_gguf(path, metadata, tensors, value_types=value_types)
    return Path(path)


def tensor_digests(path) -> list:
    """[name, type, ggml dims, sha256 of the bytes] of every tensor of a model file, in file order."""
    model = load(path)
    return [[t.name, t.type.name, list(t.dims), hashlib.sha256(t.data).hexdigest()] for t in model.tensors.values()]
