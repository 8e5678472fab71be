"""Legacy GGML LLaMA files (2023): ``ggjt`` v1-v3, ``ggmf`` v1 and the unversioned ``ggml``.

Layout (little-endian): magic u32 ('ggml' = bytes "lmgg", 'ggmf' = "fmgg", 'ggjt' = "tjgg"), version u32 (absent
for 'ggml'), hyper-parameters n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype (u32 each); n_vocab tokens
(length u32, bytes, score f32; 'ggml' has no scores); then tensors to the end of the file: n_dims u32, name length
u32, type u32, dims u32[n_dims] (ne0 first), name, padding to a multiple of 32 bytes of file offset ('ggjt' only),
data.

What each version can hold (llama.cpp's history, PRs 1405 and 1508):
- ggml, ggmf v1, ggjt v1: f32 and f16 are readable; every quantized layout of that time changed later.
- ggjt v2 (May 2023, #1405 removed bit shuffling): f32, f16, q5_0, q5_1 are today's layouts; q4_0, q4_1 and q8_0
  still stored their scales as f32 (changed to f16 by #1508, which made ggjt v3).
- ggjt v3: every type, including the K-quants (June 2023), is byte-identical to GGUF's.

GGML files carry no GQA head count, rms epsilon or context length: ``n_head_kv`` is inferred from the shape of
``layers.0.attention.wk.weight`` (or given), the others default like llama.cpp's convert-llama-ggml-to-gguf.py
(context 2048, epsilon 5e-6) unless given.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..quant.types import KNOWN_UNSUPPORTED_IDS, TYPES_BY_ID, get_type
from .cursor import Cursor, decode_text, encode_text
from .errors import CorruptFileError, UnknownTypeError, UnsupportedVersionError
from .gguf import GGUFValueType, tensor_nbytes, write_tensor_data, writing_file
from .model_file import ModelFile, Tensor, Vocab, ggml_name_from_gguf, gguf_name_from_ggml

GGML_MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}
_HPARAM_NAMES = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
_HPARAMS = struct.Struct("<7I")
_TENSOR_HEAD = struct.Struct("<3I")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")
MAX_NAME_BYTES = 4096
DEFAULT_CONTEXT_LENGTH = 2048
DEFAULT_RMS_EPS = 5e-6

# llama.cpp's LLAMA_FTYPE values of the GGML era (and BF16, which came with GGUF), for display.
FTYPE_NAMES = {
    0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 4: "MOSTLY_Q4_1_SOME_F16",
    7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1", 10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S",
    12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L", 14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S",
    17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K", 32: "MOSTLY_BF16",
}
# ggml types that existed in the GGML era (bf16 and the IQ types came with GGUF).
_GGML_ERA_TYPES = {"f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1",
                   "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K"}
_HOW_TO_FIX = ("re-convert the original weights with a current converter, or download a GGUF (or ggmlv3) "
               "file of this model")


def _container_rank(container: str, version: int) -> int:
    """Orders containers by age: ggml < ggmf v1 < ggjt v1 < ggjt v2 < ggjt v3."""
    return {"ggml": 0, "ggmf": 1}.get(container, 1 + version)


def _check_type_readable(path, container: str, version: int, row, name: str, at: int) -> None:
    if row.name not in _GGML_ERA_TYPES:
        raise UnknownTypeError(path, f"tensor {name!r} uses type {row.name}, which did not exist in GGML files", at)
    rank = _container_rank(container, version)
    label = f"{container} v{version}" if container != "ggml" else "unversioned ggml"
    if rank < 3 and row.name not in ("f32", "f16"):
        raise UnsupportedVersionError(
            path, f"tensor {name!r} is {row.name} in a {label} file; quantized layouts of files older than ggjt v2 "
            f"changed (llama.cpp PR 1405) and cannot be read: {_HOW_TO_FIX}", at)
    if rank == 3 and row.name in ("q4_0", "q4_1", "q8_0"):
        raise UnsupportedVersionError(
            path, f"tensor {name!r} is {row.name} in a ggjt v2 file, whose {row.name} blocks store f32 scales "
            f"(ggjt v3, llama.cpp PR 1508, changed them to f16) and cannot be read: {_HOW_TO_FIX}", at)


def _read_vocab(cursor: Cursor, n_vocab: int, has_scores: bool):
    min_item = 8 if has_scores else 4
    cursor.check_count(n_vocab, min_item, "vocabulary token")
    view, pos, size, path = cursor.view, cursor.pos, cursor.size, cursor.path
    unpack_u32, unpack_f32 = _U32.unpack_from, _F32.unpack_from
    token_bytes, scores = [], np.zeros(n_vocab, np.float32)
    for index in range(n_vocab):
        if pos + 4 > size:
            cursor.pos = pos
            cursor.need(4, f"length of token {index}")
        (n,) = unpack_u32(view, pos)
        pos += 4
        if n + (4 if has_scores else 0) > size - pos:
            raise CorruptFileError(path, f"token {index} claims {n} bytes but only {size - pos} remain", pos - 4)
        token_bytes.append(bytes(view[pos:pos + n]))
        pos += n
        if has_scores:
            scores[index] = unpack_f32(view, pos)[0]
            pos += 4
    cursor.pos = pos
    return token_bytes, scores


def legacy_token_types(token_bytes: list) -> np.ndarray:
    """Token types the way convert-llama-ggml-to-gguf.py assigns them: 0 unknown, 1 and 2 control, empty pieces
    control, single bytes among ids 3..258 byte tokens, everything else normal."""
    types = np.ones(len(token_bytes), np.int32)
    for tid, raw in enumerate(token_bytes):
        if tid == 0:
            types[tid] = 2
        elif tid <= 2 or len(raw) == 0:
            types[tid] = 3
        elif tid <= 258 and len(raw) == 1:
            types[tid] = 6
    return types


def gguf_tokens_from_legacy(token_bytes: list) -> list:
    """GGUF SentencePiece spellings of GGML-era pieces (as convert-llama-ggml-to-gguf.py writes them):
    '<unk>', '<s>', '</s>' for ids 0-2, '<0xNN>' for byte tokens, U+2581 for spaces."""
    out = []
    for tid, raw in enumerate(token_bytes):
        if tid <= 2:
            out.append(("<unk>", "<s>", "</s>")[tid])
        elif len(raw) == 0:
            out.append("")
        elif tid <= 258 and len(raw) == 1:
            out.append(f"<0x{raw[0]:02X}>")
        else:
            out.append(decode_text(raw.replace(b" ", "\u2581".encode())))
    return out


def legacy_vocab_from_gguf(vocab: Vocab) -> list:
    """(piece bytes, score) pairs in GGML-era conventions for a SentencePiece ("llama") vocabulary, the inverse of
    ``gguf_tokens_from_legacy`` as convert.py wrote GGML files: the unknown token as ' \u2047 ', other control
    tokens empty, '<0xNN>' byte tokens as the single raw byte, U+2581 as a plain space."""
    if vocab.token_bytes is not None:   # read from a GGML file: the stored bytes as they were
        return list(zip(vocab.token_bytes, (float(s) for s in vocab.scores)))
    if vocab.model != "llama":
        raise ValueError(f"a GGML file holds a SentencePiece (llama) vocabulary, not a {vocab.model!r} one")
    pieces = []
    for text, kind, score in zip(vocab.tokens, vocab.token_types.tolist(), vocab.scores.tolist()):
        if kind == 2:
            raw = " \u2047 ".encode()
        elif kind == 3:
            raw = b""
        elif kind == 6 and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            raw = bytes([int(text[3:5], 16)])
        else:
            raw = encode_text(text.replace("\u2581", " "))
        pieces.append((raw, float(score)))
    return pieces


def read_ggml(path, mm: np.ndarray, n_head_kv: int | None = None, context_length: int | None = None,
              rms_eps: float | None = None) -> ModelFile:
    view = memoryview(mm)
    cursor = Cursor(path, view)
    cursor.need(4, "GGML magic")
    container = GGML_MAGICS[bytes(view[:4])]
    cursor.pos = 4
    if container == "ggml":
        version = 1
    else:
        version = cursor.u32(f"{container} version")
        if (container == "ggmf" and version != 1) or (container == "ggjt" and not 1 <= version <= 3):
            raise UnsupportedVersionError(path, f"{container} version {version} is unknown (known: "
                                          f"{'1' if container == 'ggmf' else '1, 2, 3'})", 4)
    hparams = dict(zip(_HPARAM_NAMES, cursor.unpack(_HPARAMS, "hyper-parameters")))
    n_head, n_embd = hparams["n_head"], hparams["n_embd"]
    if n_head == 0 or n_embd == 0 or n_embd % n_head:
        raise CorruptFileError(path, f"n_embd {n_embd} is not a positive multiple of n_head {n_head}", cursor.pos - 28)
    token_bytes, scores = _read_vocab(cursor, hparams["n_vocab"], has_scores=container != "ggml")

    padded = container == "ggjt"
    size = len(view)
    tensors: dict[str, Tensor] = {}
    while cursor.pos < size:
        info_at = cursor.pos
        n_dims, name_len, type_id = cursor.unpack(_TENSOR_HEAD, "tensor header")
        if not 1 <= n_dims <= 4:
            raise CorruptFileError(path, f"tensor has {n_dims} dimensions (1 to 4 allowed)", info_at)
        if not 0 < name_len <= min(MAX_NAME_BYTES, cursor.remaining):
            raise CorruptFileError(path, f"tensor name length {name_len} is absurd", info_at + 4)
        dims = cursor.unpack(struct.Struct(f"<{n_dims}I"), "tensor dimensions")
        source_name = decode_text(cursor.raw(name_len, "tensor name"))
        row = TYPES_BY_ID.get(type_id)
        if row is None:
            known = KNOWN_UNSUPPORTED_IDS.get(type_id)
            raise UnknownTypeError(path, f"tensor {source_name!r} uses " + (
                f"ggml type {type_id} ({known}), which this engine does not support" if known
                else f"unknown ggml type id {type_id}"), info_at + 8)
        _check_type_readable(path, container, version, row, source_name, info_at + 8)
        if padded:
            cursor.skip_to(cursor.pos + (-cursor.pos % 32), f"data of tensor {source_name!r}")
        nbytes = tensor_nbytes(path, row, dims, source_name, info_at)
        start = cursor.pos
        if nbytes > size - start:
            raise CorruptFileError(path, f"tensor {source_name!r} data ({nbytes} bytes at {start}) runs past the "
                                   f"end of the file (size {size})", info_at)
        name = gguf_name_from_ggml(source_name) or source_name
        if name in tensors:
            raise CorruptFileError(path, f"duplicate tensor name {source_name!r}", info_at)
        tensors[name] = Tensor(name=name, type=row, shape=tuple(reversed(dims)), offset=start, nbytes=nbytes,
                               data=mm[start:start + nbytes].view(np.ndarray), source_name=source_name)
        cursor.pos = start + nbytes

    n_head_kv = _n_head_kv(path, hparams, tensors, n_head_kv)
    ffn = tensors.get("blk.0.ffn_gate.weight")
    n_ff = ffn.shape[0] if ffn is not None and len(ffn.shape) == 2 else \
        ((2 * (4 * n_embd) // 3 + hparams["n_mult"] - 1) // max(hparams["n_mult"], 1)) * hparams["n_mult"]
    token_types = legacy_token_types(token_bytes)
    metadata, metadata_types = _gguf_metadata(path, container, version, hparams, n_ff, n_head_kv,
                                              DEFAULT_CONTEXT_LENGTH if context_length is None else context_length,
                                              DEFAULT_RMS_EPS if rms_eps is None else rms_eps,
                                              token_bytes, scores, token_types)
    vocab = Vocab(model="llama", tokens=[decode_text(t) for t in token_bytes], scores=scores,
                  token_types=token_types, style="ggml-legacy", token_bytes=token_bytes,
                  bos_token_id=1, eos_token_id=2, unknown_token_id=0)
    first = min((t.offset for t in tensors.values()), default=size)
    return ModelFile(path=Path(path), format="ggml", version=version, container=container, metadata=metadata,
                     metadata_types=metadata_types, vocab=vocab, tensors=tensors, tensor_data_offset=first,
                     alignment=32 if padded else 1, file_size=size, mmap=mm, hparams=hparams)


def _n_head_kv(path, hparams: dict, tensors: dict, given: int | None) -> int:
    n_head, n_embd = hparams["n_head"], hparams["n_embd"]
    if given is not None:
        if given <= 0 or n_head % given:
            raise ValueError(f"n_head_kv={given} must be a positive divisor of n_head={n_head}")
        return int(given)
    wk = tensors.get("blk.0.attn_k.weight")
    if wk is None or len(wk.shape) != 2:
        return n_head
    # wk maps n_embd inputs to n_head_kv * head_dim outputs, head_dim = n_embd / n_head.
    kv_rows = wk.shape[0]
    if (n_head * kv_rows) % n_embd or not 0 < n_head * kv_rows // n_embd <= n_head:
        raise CorruptFileError(path, f"attention.wk has {kv_rows} rows, which is not a whole number of heads of "
                               f"{n_embd // n_head}; pass n_head_kv=", wk.offset)
    return n_head * kv_rows // n_embd


def _gguf_metadata(path, container, version, hparams, n_ff, n_head_kv, context_length, rms_eps,
                   token_bytes, scores, token_types):
    """The GGUF keys equivalent to a GGML header, as convert-llama-ggml-to-gguf.py would write them."""
    T = GGUFValueType
    ftype = hparams["ftype"]
    entries = [
        ("general.architecture", "llama", T.STRING),
        ("general.name", Path(path).name, T.STRING),
        ("general.description", f"converted from legacy {container.upper()}v{version} "
                                f"{FTYPE_NAMES.get(ftype, str(ftype))} format", T.STRING),
        ("general.file_type", ftype, T.UINT32),
        ("llama.context_length", int(context_length), T.UINT32),
        ("llama.embedding_length", hparams["n_embd"], T.UINT32),
        ("llama.block_count", hparams["n_layer"], T.UINT32),
        ("llama.feed_forward_length", int(n_ff), T.UINT32),
        ("llama.rope.dimension_count", hparams["n_embd"] // hparams["n_head"], T.UINT32),
        ("llama.attention.head_count", hparams["n_head"], T.UINT32),
        ("llama.attention.head_count_kv", int(n_head_kv), T.UINT32),
        ("llama.attention.layer_norm_rms_epsilon", float(rms_eps), T.FLOAT32),
        ("tokenizer.ggml.model", "llama", T.STRING),
        ("tokenizer.ggml.pre", "default", T.STRING),
        ("tokenizer.ggml.tokens", gguf_tokens_from_legacy(token_bytes), T.STRING),
        ("tokenizer.ggml.scores", scores, T.FLOAT32),
        ("tokenizer.ggml.token_type", token_types, T.INT32),
        ("tokenizer.ggml.unknown_token_id", 0, T.UINT32),
        ("tokenizer.ggml.bos_token_id", 1, T.UINT32),
        ("tokenizer.ggml.eos_token_id", 2, T.UINT32),
    ]
    return {k: v for k, v, _ in entries}, {k: t for k, _, t in entries}


# ----------------------------------------------------------------------------------------------------- writer

def write_ggml(path, hparams: dict, vocab: list, tensors: list, *, progress=False) -> None:
    """Write a ``ggjt`` v3 file.

    ``hparams``: n_vocab (optional, defaults to len(vocab)), n_embd, n_mult, n_head, n_layer, n_rot, ftype.
    ``vocab``: list of (piece bytes-or-str, score) in GGML-era conventions (plain spaces, raw byte tokens).
    ``tensors``: list of (name, type, shape, data) like ``write_gguf``'s; a GGUF LLaMA name is written under its
    legacy GGML name. Data may be bytes-like, a callable or an iterable of chunks.
    """
    values = dict(hparams)
    values.setdefault("n_vocab", len(vocab))
    if values["n_vocab"] != len(vocab):
        raise ValueError(f"n_vocab={values['n_vocab']} but the vocabulary has {len(vocab)} pieces")
    layout = []
    for name, type_, shape, data in tensors:
        row = get_type(type_)
        if row.name not in _GGML_ERA_TYPES:
            raise ValueError(f"tensor {name!r}: type {row.name} cannot be stored in a GGML file")
        dims = tuple(int(d) for d in reversed(tuple(shape)))
        if not 1 <= len(dims) <= 4 or any(d >= 2 ** 32 for d in dims):
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} cannot be stored in a GGML file")
        layout.append((encode_text(ggml_name_from_gguf(name) or name), row, dims,
                       tensor_nbytes(path, row, dims, name, None), data))
    with writing_file(path, progress, sum(item[3] for item in layout)) as (out, bar):
        out.write(b"tjgg" + _U32.pack(3) + _HPARAMS.pack(*(int(values[k]) for k in _HPARAM_NAMES)))
        for piece, score in vocab:
            raw = encode_text(piece)
            out.write(_U32.pack(len(raw)) + raw + _F32.pack(float(score)))
        for raw_name, row, dims, nbytes, data in layout:
            out.write(_TENSOR_HEAD.pack(len(dims), len(raw_name), row.type_id))
            out.write(struct.pack(f"<{len(dims)}I", *dims) + raw_name)
            out.write(b"\0" * (-out.tell() % 32))
            write_tensor_data(out, raw_name.decode(), data, nbytes, bar)
