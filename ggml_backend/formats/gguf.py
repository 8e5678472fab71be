"""GGUF (v2, v3) reader and writer.

Layout (little-endian): magic "GGUF", version u32, n_tensors u64, n_kv u64; n_kv key/value pairs (key: string,
type: u32, value); n_tensors tensor infos (name: string, n_dims: u32, dims: u64[n_dims] (ne0 first), type: u32,
offset: u64 relative to the data section); padding to ``general.alignment`` (default 32); tensor data.
A string is a u64 length and that many UTF-8 bytes; an array is an element type u32, a count u64 and the elements.

The reader walks the header straight out of the memory map with ``struct``; numeric arrays become numpy arrays
with one ``np.frombuffer`` each; big string arrays (a vocabulary and its merges) are walked by a compiled loop
and decoded in one piece (``_read_string_array_compiled``), small ones by a Python loop.
"""
from __future__ import annotations

import contextlib
import os
import stat
import struct
import tempfile
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from numba import njit

from ..quant.types import KNOWN_UNSUPPORTED_IDS, TYPES_BY_ID, QuantType, get_type
from .cursor import Cursor, decode_text, encode_text
from .errors import CorruptFileError, UnknownTypeError, UnsupportedVersionError
from .model_file import ModelFile, Tensor, Vocab

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 4096        # ggml allows 64; old converters wrote longer ones, so be generous but bounded
MAX_ARRAY_NESTING = 8


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("u1"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + code) for t, code in zip(
    (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
     GGUFValueType.INT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.UINT64, GGUFValueType.INT64,
     GGUFValueType.FLOAT64), "BbHhIifBQqd")}
_U64 = struct.Struct("<Q")
_TENSOR_INFO_TAIL = struct.Struct("<IQ")


def _value_type(cursor: Cursor, raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise CorruptFileError(cursor.path, f"{what} has unknown GGUF value type {raw}", cursor.pos - 4) from None


def _read_string(cursor: Cursor, what: str) -> str:
    start = cursor.pos
    n = cursor.u64(f"length of {what}")
    if n > cursor.remaining:
        raise CorruptFileError(cursor.path, f"{what} claims {n} bytes but only {cursor.remaining} remain", start)
    text = decode_text(cursor.view[cursor.pos:cursor.pos + n])
    cursor.pos += n
    return text


def _read_string_array(cursor: Cursor, count: int, what: str) -> list:
    if count >= _COMPILED_WALK_MIN:
        texts = _read_string_array_compiled(cursor, count)
        if texts is not None:
            return texts
    # The loop below reads small arrays, and big ones that are corrupt or not plain UTF-8 (it names what is
    # wrong and where, and keeps invalid bytes as surrogate escapes): locals only, one struct call and one decode
    # per item.
    view, pos, size, path = cursor.view, cursor.pos, cursor.size, cursor.path
    unpack_len = _U64.unpack_from
    out = []
    append = out.append
    for index in range(count):
        if pos + 8 > size:
            cursor.pos = pos
            cursor.need(8, f"length of {what}[{index}]")
        (n,) = unpack_len(view, pos)
        pos += 8
        if n > size - pos:
            raise CorruptFileError(path, f"{what}[{index}] claims {n} bytes but only {size - pos} remain", pos - 8)
        append(str(view[pos:pos + n], "utf-8", "surrogateescape"))
        pos += n
    cursor.pos = pos
    return out


#: string arrays at least this long (a vocabulary, its merges) are walked by the compiled ``_walk_strings``
_COMPILED_WALK_MIN = 4096


def _read_string_array_compiled(cursor: Cursor, count: int) -> list | None:
    """The ``count`` strings at the cursor, as ``_read_string_array``'s loop reads them, or None where that loop
    must read them: a string that does not fit in the file, or bytes that are not all UTF-8.

    The loop took 0.19 s of the 0.2 s of opening Qwen's file (151,936 tokens and 151,387 merges: a struct call
    and a decode each). Here a compiled walk finds each string and copies all of them into one buffer, which is
    decoded once; each string is then a slice of that text, at the character offsets the walk counted (UTF-8:
    every byte that is not a continuation byte starts a character). That equals decoding each string alone when
    the whole buffer is valid UTF-8 and no string starts with a continuation byte (then no character spans two
    strings); otherwise the loop decodes them one by one."""
    data = np.frombuffer(cursor.view, np.uint8)
    joined, char_ends, end, whole = _walk_strings(data, cursor.pos, count)
    if not whole:
        return None
    try:
        text = str(joined, "utf-8")   # strict: a file with invalid bytes keeps the loop's surrogate escapes
    except UnicodeDecodeError:
        return None
    cursor.pos = int(end)
    ends = char_ends.tolist()
    return [text[a:b] for a, b in zip([0] + ends[:-1], ends)]


@njit(cache=True, nogil=True)
def _walk_strings(data, pos, count):
    """``count`` GGUF strings (a u64 length and that many bytes) from byte ``pos`` of ``data``: (their bytes
    joined, each string's end in characters of the joined text, the offset after the last one, whole). ``whole``
    is False when a string does not fit in ``data`` or starts with a UTF-8 continuation byte (10xxxxxx)."""
    size = data.size
    total = np.int64(0)
    walk = pos
    for _ in range(count):                 # first the lengths, checked, so that the copy below cannot overrun
        if walk + 8 > size:
            return np.empty(0, np.uint8), np.empty(0, np.int64), walk, False
        n = np.uint64(0)
        for b in range(8):
            n |= np.uint64(data[walk + b]) << np.uint64(8 * b)
        walk += 8
        if n > np.uint64(size - walk):
            return np.empty(0, np.uint8), np.empty(0, np.int64), walk, False
        walk += np.int64(n)
        total += np.int64(n)
    joined = np.empty(total, np.uint8)
    char_ends = np.empty(count, np.int64)
    chars = np.int64(0)
    out = np.int64(0)
    walk = pos
    for i in range(count):
        n = np.int64(0)
        for b in range(8):
            n |= np.int64(data[walk + b]) << (8 * b)
        walk += 8
        if n > 0 and data[walk] & 0xC0 == 0x80:
            return joined, char_ends, walk, False
        for j in range(n):
            byte = data[walk + j]
            joined[out + j] = byte
            chars += byte & 0xC0 != 0x80
        out += n
        walk += n
        char_ends[i] = chars
    return joined, char_ends, walk, True


def _read_array(cursor: Cursor, what: str, depth: int):
    start = cursor.pos
    item_type = _value_type(cursor, cursor.u32(f"element type of {what}"), what)
    count = cursor.u64(f"element count of {what}")
    if item_type == GGUFValueType.STRING:
        cursor.check_count(count, 8, what)
        return _read_string_array(cursor, count, what), item_type
    if item_type == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise CorruptFileError(cursor.path, f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep", start)
        cursor.check_count(count, 12, what)
        return [_read_array(cursor, f"{what}[{i}]", depth + 1)[0] for i in range(count)], item_type
    dtype = _NUMPY_DTYPES[item_type]
    cursor.check_count(count, dtype.itemsize, what)
    values = np.frombuffer(cursor.view, dtype=dtype, count=count, offset=cursor.pos).copy()
    cursor.pos += count * dtype.itemsize
    if item_type == GGUFValueType.BOOL:
        values = values.astype(bool)
    return values, item_type


def _read_value(cursor: Cursor, value_type: GGUFValueType, what: str):
    if value_type == GGUFValueType.STRING:
        return _read_string(cursor, what), value_type
    if value_type == GGUFValueType.ARRAY:
        return _read_array(cursor, what, 0)
    (value,) = cursor.unpack(_SCALAR_STRUCTS[value_type], what)
    if value_type == GGUFValueType.BOOL:
        value = bool(value)
    return value, value_type


def _tensor_type(cursor: Cursor, type_id: int, name: str, at: int) -> QuantType:
    row = TYPES_BY_ID.get(type_id)
    if row is None:
        known = KNOWN_UNSUPPORTED_IDS.get(type_id)
        what = f"ggml type {type_id} ({known}), which this engine does not support" if known else \
            f"unknown ggml type id {type_id}"
        raise UnknownTypeError(cursor.path, f"tensor {name!r} uses {what}", at)
    return row


def tensor_nbytes(cursor_path, row: QuantType, dims: tuple, name: str, at: int) -> int:
    """Byte size of a tensor with ggml ``dims``; refuses a row length that is not a whole number of blocks."""
    if dims and dims[0] % row.block_size:
        raise CorruptFileError(cursor_path, f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                               f"{row.name} block size {row.block_size}", at)
    n_elements = 1
    for d in dims:
        n_elements *= d
    return n_elements // row.block_size * row.type_size


def read_gguf(path, mm: np.ndarray, n_head_kv: int | None = None) -> ModelFile:
    view = memoryview(mm)
    cursor = Cursor(path, view)
    cursor.need(4, "GGUF magic")
    cursor.pos = 4
    version = cursor.u32("GGUF version")
    if version == 1:
        raise UnsupportedVersionError(
            path, "GGUF version 1 (from before October 2023, with 32-bit counts) is not supported; "
            "download a current GGUF or re-convert the original weights with a current llama.cpp converter", 4)
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (this looks like a big-endian GGUF, which is not supported)" if swapped in (2, 3) else ""
        raise UnsupportedVersionError(path, f"GGUF version {version} is not supported (only 2 and 3){hint}", 4)
    n_tensors = cursor.u64("tensor count")
    n_kv = cursor.u64("metadata key/value count")
    cursor.check_count(n_kv, 8 + 4 + 1, "metadata key/value")

    metadata: dict[str, Any] = {}
    metadata_types: dict[str, GGUFValueType] = {}
    for _ in range(n_kv):
        key_at = cursor.pos
        key = _read_string(cursor, "metadata key")
        if key in metadata:
            raise CorruptFileError(path, f"duplicate metadata key {key!r}", key_at)
        value_type = _value_type(cursor, cursor.u32(f"value type of {key!r}"), f"metadata key {key!r}")
        metadata[key], metadata_types[key] = _read_value(cursor, value_type, f"metadata {key!r}")

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if metadata_types["general.alignment"] != GGUFValueType.UINT32 or alignment <= 0 or \
                alignment & (alignment - 1):
            raise CorruptFileError(path, f"general.alignment must be a u32 power of two, got {alignment!r}")

    cursor.check_count(n_tensors, 8 + 4 + 4 + 8, "tensor info")
    infos = []
    names = set()
    for _ in range(n_tensors):
        info_at = cursor.pos
        name = _read_string(cursor, "tensor name")
        if len(name) > MAX_NAME_BYTES:
            raise CorruptFileError(path, f"tensor name of {len(name)} characters is absurd", info_at)
        if name in names:
            raise CorruptFileError(path, f"duplicate tensor name {name!r}", info_at)
        names.add(name)
        n_dims = cursor.u32(f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise CorruptFileError(path, f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})",
                                   cursor.pos - 4)
        cursor.need(8 * n_dims, f"dimensions of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", view, cursor.pos)
        cursor.pos += 8 * n_dims
        type_at = cursor.pos
        type_id, rel_offset = cursor.unpack(_TENSOR_INFO_TAIL, f"type and offset of tensor {name!r}")
        row = _tensor_type(cursor, type_id, name, type_at)
        if rel_offset % alignment:
            raise CorruptFileError(path, f"tensor {name!r} data offset {rel_offset} is not a multiple of the "
                                   f"alignment {alignment}", type_at + 4)
        nbytes = tensor_nbytes(path, row, dims, name, info_at)
        infos.append((name, row, dims, rel_offset, nbytes, info_at))

    data_offset = -(-cursor.pos // alignment) * alignment
    file_size = len(view)
    tensors: dict[str, Tensor] = {}
    for name, row, dims, rel_offset, nbytes, info_at in infos:
        start = data_offset + rel_offset
        if start + nbytes > file_size:
            raise CorruptFileError(path, f"tensor {name!r} data ({nbytes} bytes at {start}) runs past the end of "
                                   f"the file (size {file_size})", info_at)
        data = mm[start:start + nbytes].view(np.ndarray)
        tensors[name] = Tensor(name=name, type=row, shape=tuple(reversed(dims)), offset=start, nbytes=nbytes,
                               data=data, source_name=name)

    arch = metadata.get("general.architecture")
    if n_head_kv is not None and isinstance(arch, str):
        metadata[f"{arch}.attention.head_count_kv"] = int(n_head_kv)
        metadata_types[f"{arch}.attention.head_count_kv"] = GGUFValueType.UINT32
    return ModelFile(path=Path(path), format="gguf", version=version, container="gguf", metadata=metadata,
                     metadata_types=metadata_types, vocab=vocab_from_metadata(metadata, path), tensors=tensors,
                     tensor_data_offset=data_offset, alignment=alignment, file_size=file_size, mmap=mm)


def vocab_from_metadata(metadata: dict, path=None) -> Vocab | None:
    """The ``tokenizer.ggml.*`` keys as a Vocab; a key of the wrong kind or length is a CorruptFileError."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    if not isinstance(tokens, list) or (tokens and not isinstance(tokens[0], str)):
        raise CorruptFileError(path, "tokenizer.ggml.tokens is not an array of strings")
    n = len(tokens)

    def numeric_array(key, dtype, default):
        value = metadata.get(key)
        if value is None:
            return np.full(n, default, dtype)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf" or len(value) != n:
            raise CorruptFileError(path, f"{key} is not a numeric array of {n} entries like tokenizer.ggml.tokens")
        return value.astype(dtype, copy=False)

    def token_id(key):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if isinstance(value, (bool, str, list, np.ndarray, float)):
            raise CorruptFileError(path, f"tokenizer.ggml.{key} is not an integer")
        return int(value)

    merges = metadata.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or (merges and not isinstance(merges[0], str)):
        raise CorruptFileError(path, "tokenizer.ggml.merges is not an array of strings")
    model = metadata.get("tokenizer.ggml.model", "")
    return Vocab(model=model if isinstance(model, str) else str(model), tokens=tokens,
                 scores=numeric_array("tokenizer.ggml.scores", np.float32, 0.0),
                 token_types=numeric_array("tokenizer.ggml.token_type", np.int32, 1), merges=list(merges),
                 style="gguf", bos_token_id=token_id("bos_token_id"), eos_token_id=token_id("eos_token_id"),
                 unknown_token_id=token_id("unknown_token_id"), padding_token_id=token_id("padding_token_id"))


# ----------------------------------------------------------------------------------------------------- writer

def _infer_scalar_type(value) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING
    if isinstance(value, np.generic):
        for t, d in _NUMPY_DTYPES.items():
            if d == value.dtype.newbyteorder("<") and t != GGUFValueType.BOOL:
                return t
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2 ** 32:
            return GGUFValueType.UINT32
        if -2 ** 31 <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v >= 0 else GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    raise ValueError(f"cannot store a {type(value).__name__} in GGUF metadata; pass value_types")


def _infer_array_type(values) -> GGUFValueType:
    if isinstance(values, np.ndarray):
        if values.dtype == np.bool_:
            return GGUFValueType.BOOL
        for t, d in _NUMPY_DTYPES.items():
            if t != GGUFValueType.BOOL and d == values.dtype.newbyteorder("<"):
                return t
        raise ValueError(f"cannot store a numpy array of {values.dtype} in GGUF metadata")
    if len(values) == 0:
        return GGUFValueType.UINT32
    first = values[0]
    if isinstance(first, (list, tuple, np.ndarray)):
        return GGUFValueType.ARRAY
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return GGUFValueType.BOOL
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        lo, hi = min(values), max(values)
        if lo >= 0:
            return GGUFValueType.UINT32 if hi < 2 ** 32 else GGUFValueType.UINT64
        return GGUFValueType.INT32 if lo >= -2 ** 31 and hi < 2 ** 31 else GGUFValueType.INT64
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return GGUFValueType.FLOAT32
    return _infer_scalar_type(first)


def _encode_string(text) -> bytes:
    data = encode_text(text)
    return _U64.pack(len(data)) + data


def _encode_value(value, value_type: GGUFValueType, element_type: GGUFValueType | None = None) -> bytes:
    """Bytes of a value without its leading type tag (an array's element type, count and items)."""
    if value_type == GGUFValueType.STRING:
        return _encode_string(value)
    if value_type == GGUFValueType.ARRAY:
        element_type = _infer_array_type(value) if element_type is None else GGUFValueType(element_type)
        head = struct.pack("<IQ", element_type, len(value))
        if element_type == GGUFValueType.STRING:
            return head + b"".join(_encode_string(v) for v in value)
        if element_type == GGUFValueType.ARRAY:
            return head + b"".join(_encode_value(v, GGUFValueType.ARRAY) for v in value)
        return head + np.asarray(value).astype(_NUMPY_DTYPES[element_type]).tobytes()
    if value_type == GGUFValueType.BOOL:
        return struct.pack("<B", 1 if value else 0)
    return _SCALAR_STRUCTS[value_type].pack(value)


def _encode_kv(key: str, value, declared: GGUFValueType | None) -> bytes:
    is_array = isinstance(value, (list, tuple, np.ndarray))
    if is_array:
        return _encode_string(key) + struct.pack("<I", GGUFValueType.ARRAY) + \
            _encode_value(value, GGUFValueType.ARRAY, declared)
    value_type = _infer_scalar_type(value) if declared is None else GGUFValueType(declared)
    return _encode_string(key) + struct.pack("<I", value_type) + _encode_value(value, value_type)


def _iter_chunks(data) -> Iterable:
    """Tensor data given as bytes-like, a callable returning bytes-like or chunks, or an iterable of chunks."""
    if callable(data):
        data = data()
    if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        yield data
        return
    yield from data


def write_tensor_data(out, name: str, data, nbytes: int, progress=None) -> None:
    written = 0
    for chunk in _iter_chunks(data):
        if isinstance(chunk, np.ndarray):
            chunk = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
        written += len(memoryview(chunk).cast("B"))
        if written > nbytes:
            raise ValueError(f"tensor {name!r}: data is longer than the {nbytes} bytes its type and shape need")
        out.write(chunk)
        if progress is not None:
            progress.update(len(memoryview(chunk).cast("B")))
    if written != nbytes:
        raise ValueError(f"tensor {name!r}: got {written} bytes of data, its type and shape need {nbytes}")


def write_gguf(path, metadata: dict, tensors: list, alignment: int = DEFAULT_ALIGNMENT, *,
               value_types: dict | None = None, version: int = 3, progress: bool | Any = False) -> None:
    """Write a GGUF file tensor by tensor.

    ``metadata``: key -> value (str, bool, int, float, list, numpy array); value types are inferred (int -> u32
    when it fits, float -> f32, list of str -> string array) unless ``value_types[key]`` names one (for arrays, the
    element type); ``ModelFile.metadata_types`` has this shape, so a file read can be written back exactly.
    ``tensors``: a list of ``(name, type, shape, data)``: type a QuantType or its name, shape in numpy order, data
    raw bytes (bytes-like or uint8 array) or a callable returning them or an iterable of chunks, so a multi-GB file
    is written without holding it in memory. ``progress``: True for a tqdm bar on stderr, or a tqdm-like object.
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    value_types = dict(value_types or {})
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in metadata:
        if metadata.setdefault("general.alignment", alignment) != alignment:
            raise ValueError(f"metadata general.alignment={metadata['general.alignment']} but alignment={alignment}")
        value_types["general.alignment"] = GGUFValueType.UINT32

    header = [GGUF_MAGIC, struct.pack("<IQQ", version, len(tensors), len(metadata))]
    header += [_encode_kv(key, value, value_types.get(key)) for key, value in metadata.items()]
    rel_offset = 0
    layout = []
    for name, type_, shape, data in tensors:
        row = get_type(type_)
        dims = tuple(int(d) for d in reversed(tuple(shape)))
        if len(dims) > MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {len(dims)} dimensions (at most {MAX_DIMS})")
        nbytes = tensor_nbytes(path, row, dims, name, None)
        header.append(_encode_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, row.type_id,
                                                         rel_offset))
        layout.append((name, nbytes, data))
        rel_offset += -(-nbytes // alignment) * alignment

    with writing_file(path, progress, sum(n for _, n, _ in layout)) as (out, bar):
        head = b"".join(header)
        out.write(head)
        out.write(b"\0" * (-len(head) % alignment))
        for name, nbytes, data in layout:
            write_tensor_data(out, name, data, nbytes, bar)
            out.write(b"\0" * (-nbytes % alignment))


def _progress_bar(progress, total: int, desc: str):
    if progress is True:
        import sys
        from tqdm import tqdm
        # delay: short conversions finish before a bar would appear
        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, delay=1.0)
    return progress or None


@contextlib.contextmanager
def writing_file(path, progress, total_bytes: int):
    """Open a new model file for ``path``: yields (file, progress bar or None).

    The data goes to a temporary file beside ``path`` (same directory, so the same file system), flushed to disk
    and renamed over ``path`` only when complete: a failure (a full disk, Ctrl-C) part-way leaves ``path`` as it
    was, whatever it was, and removes only the temporary file this call created. A ``path`` that exists and is not
    a regular file (a directory, a device such as /dev/full, a FIFO) is refused before anything is written, so it is
    never replaced; a symlink keeps pointing where it did, at the new file."""
    path = Path(path)
    final = Path(os.path.realpath(path))
    try:
        existing = final.stat()
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: cannot write a model file here: {exc.strerror}") from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        kind = "a directory" if stat.S_ISDIR(existing.st_mode) else _file_kind(existing.st_mode)
        raise ValueError(f"{path}: is {kind}, not a regular file; a model file is only written to a regular file")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: cannot create a file in {final.parent}: {exc.strerror}") from None
    bar = _progress_bar(progress, total_bytes, f"writing {path.name}")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, bar
            out.flush()
            os.fsync(out.fileno())   # the bytes are on disk before the name points at them
        os.chmod(tmp_name, existing.st_mode & 0o7777 if existing is not None else 0o666 & ~_umask())
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)      # only the temporary file created above, never ``path``
        raise
    finally:
        if bar is not None and progress is True:
            bar.close()


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _umask() -> int:
    mask = os.umask(0o022)   # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
