"""Bad input never crashes the readers: thousands of seeded mutations of the shared files' headers (bit flips,
overwritten u32/u64 fields, random bytes, truncations) each either load with every tensor inside the file or raise
a ModelFileError; plus one explicit case for each kind of damage, checking the message names file and offset."""
from __future__ import annotations

import random
import shutil
import struct
import time

import numpy as np
import pytest

import ggml_backend
from ggml_backend.formats import (BadMagicError, CorruptFileError, ModelFileError, TruncatedFileError,
                                  UnknownTypeError, UnsupportedVersionError, write_gguf)
from refdata import synthetic_file

TIME_BUDGET_S = 20.0     # per file kind; the loop stops early rather than overrun
MUTATIONS = 2500
TRUNCATIONS = 150


def _check_load(path):
    try:
        model = ggml_backend.load(path)
    except ModelFileError as exc:
        assert str(path) in str(exc)
        return "error"
    size = path.stat().st_size
    assert model.file_size == size
    for t in model.tensors.values():
        assert 0 <= t.offset and t.offset + t.nbytes <= size, t
        assert t.data.nbytes == t.nbytes
    return "loaded"


def _regions(kind, raw: bytes, model):
    """Byte ranges worth hitting: fixed header, tensor-info records, everything before the tensor data."""
    first_data = min(t.offset for t in model.tensors.values())
    names = [t.source_name.encode() for t in model.tensors.values()]
    name_spots = [raw.find(n) for n in names if raw.find(n) >= 0]
    info_start = max(0, min(name_spots) - 64)
    return [(0, 64), (info_start, first_data), (0, first_data)]


@pytest.mark.parametrize("kind", ["gguf", "ggml"])
def test_random_header_mutations(tmp_path, kind):
    source = synthetic_file("q4_0", kind)
    raw = source.read_bytes()
    model = ggml_backend.load(source)
    regions = _regions(kind, raw, model)
    del model
    rng = random.Random(1234 if kind == "gguf" else 4321)
    path = tmp_path / source.name
    shutil.copyfile(source, path)
    outcomes = {"loaded": 0, "error": 0}
    deadline = time.monotonic() + TIME_BUDGET_S
    with open(path, "r+b") as f:
        for i in range(MUTATIONS):
            if time.monotonic() > deadline:
                break
            lo, hi = regions[rng.choices(range(3), weights=[4, 3, 3])[0]]
            pos = rng.randrange(lo, hi - 8)
            what = rng.randrange(4)
            original = raw[pos:pos + 8]
            if what == 0:      # one bit
                new = bytes([original[0] ^ (1 << rng.randrange(8))]) + original[1:]
            elif what == 1:    # a u32 field set to an edge value
                new = struct.pack("<I", rng.choice([0, 1, 5, 31, 2 ** 31, 2 ** 32 - 1, rng.randrange(2 ** 32)])) \
                    + original[4:]
            elif what == 2:    # a u64 field set to an edge value
                new = struct.pack("<Q", rng.choice([0, 2 ** 60, 2 ** 63, 2 ** 64 - 1, rng.randrange(2 ** 64),
                                                     len(raw), len(raw) + 1]))
            else:              # random bytes
                new = bytes(rng.randrange(256) for _ in range(8))
            f.seek(pos)
            f.write(new)
            f.flush()
            outcomes[_check_load(path)] += 1
            f.seek(pos)
            f.write(original)
            f.flush()
    print(f"\n{kind}: {outcomes}")
    assert outcomes["error"] > 100 and sum(outcomes.values()) > 500


@pytest.mark.parametrize("kind", ["gguf", "ggml"])
def test_truncations(tmp_path, kind):
    raw = synthetic_file("q4_0", kind).read_bytes()
    rng = random.Random(99)
    header_end = 100_000
    lengths = sorted({rng.randrange(0, header_end) for _ in range(TRUNCATIONS)} | {0, 3, 4, 8, 20, len(raw) - 1})
    for n in lengths:
        path = tmp_path / f"cut{n}.{kind}"
        path.write_bytes(raw[:n])
        with pytest.raises(ModelFileError) as info:
            ggml_backend.load(path)
        assert str(path) in str(info.value)
        path.unlink()


# ------------------------------------------------------------------------------------------- explicit cases

def _gguf_header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _gguf_string(text: bytes, length=None):
    return struct.pack("<Q", len(text) if length is None else length) + text


def _tensor_info(name=b"t", dims=(32,), type_id=0, offset=0):
    return _gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


CASES = {
    "empty file": (b"", TruncatedFileError, r"too short.* at offset 0"),
    "wrong magic": (b"PK\x03\x04" + b"\0" * 60, BadMagicError, r"not a GGUF or GGML.* at offset 0"),
    "unknown GGUF version": (_gguf_header(version=7), UnsupportedVersionError, r"version 7 .* at offset 4"),
    "big-endian GGUF": (_gguf_header(version=3 << 24), UnsupportedVersionError, r"big-endian"),
    "tensor count 2^60": (_gguf_header(n_tensors=2 ** 60), CorruptFileError,
                          r"tensor info count 1152921504606846976 cannot fit.* at offset 24"),
    "kv count 2^62": (_gguf_header(n_kv=2 ** 62), CorruptFileError, r"key/value count .* at offset 24"),
    "key longer than file": (_gguf_header(n_kv=1) + _gguf_string(b"abc" + b"\0" * 16, 2 ** 40), CorruptFileError,
                             r"metadata key claims 1099511627776 bytes.* at offset 24"),
    "string value longer than file": (_gguf_header(n_kv=1) + _gguf_string(b"k") + struct.pack("<I", 8)
                                      + _gguf_string(b"v", 10 ** 6), CorruptFileError, r"claims 1000000 bytes"),
    "array count absurd": (_gguf_header(n_kv=1) + _gguf_string(b"k") + struct.pack("<IIQ", 9, 6, 2 ** 61),
                           CorruptFileError, r"'k' count 2305843009213693952 cannot fit"),
    "unknown value type": (_gguf_header(n_kv=1) + _gguf_string(b"k") + struct.pack("<I", 13),
                           CorruptFileError, r"unknown GGUF value type 13 at offset 33"),
    "nested arrays too deep": (_gguf_header(n_kv=1) + _gguf_string(b"k") + struct.pack("<I", 9)
                               + struct.pack("<IQ", 9, 1) * 20, CorruptFileError, r"nests arrays"),
    "duplicate key": (_gguf_header(n_kv=2) + (_gguf_string(b"k") + struct.pack("<IB", 0, 1)) * 2,
                      CorruptFileError, r"duplicate metadata key 'k' at offset 38"),
    "five dims": (_gguf_header(n_tensors=1) + _tensor_info(dims=(32, 1, 1, 1, 1)), CorruptFileError,
                  r"'t' has 5 dimensions"),
    "dims product overflows": (_gguf_header(n_tensors=1) + _tensor_info(dims=(2 ** 63, 2 ** 63)),
                               CorruptFileError, r"runs past the end of the file"),
    "unknown type id": (_gguf_header(n_tensors=1) + _tensor_info(type_id=77), UnknownTypeError,
                        r"unknown ggml type id 77 at offset 45"),
    "unsupported iq type": (_gguf_header(n_tensors=1) + _tensor_info(dims=(256,), type_id=16), UnknownTypeError,
                            r"iq2_xxs"),
    "row not whole blocks": (_gguf_header(n_tensors=1) + _tensor_info(dims=(33,), type_id=2), CorruptFileError,
                             r"row length 33 is not a multiple of the q4_0 block size 32"),
    "misaligned offset": (_gguf_header(n_tensors=1) + _tensor_info(offset=3), CorruptFileError,
                          r"offset 3 is not a multiple of the alignment 32"),
    "data past end": (_gguf_header(n_tensors=1) + _tensor_info(dims=(1024,)), CorruptFileError,
                      r"tensor 't' data \(4096 bytes at 64\) runs past the end of the file \(size 57\) at offset 24"),
    "ggjt v4": (b"tjgg" + struct.pack("<I", 4), UnsupportedVersionError, r"ggjt version 4 is unknown"),
    "ggml vocab count absurd": (b"tjgg" + struct.pack("<I7I", 3, 2 ** 31, 64, 32, 4, 1, 16, 1),
                                CorruptFileError, r"vocabulary token count 2147483648 cannot fit"),
    "ggml n_head zero": (b"tjgg" + struct.pack("<I7I", 3, 0, 64, 32, 0, 1, 16, 1), CorruptFileError,
                         r"n_embd 64 is not a positive multiple of n_head 0"),
    "ggml tensor with 7 dims": (b"tjgg" + struct.pack("<I7I", 3, 0, 64, 32, 4, 1, 16, 1)
                                + struct.pack("<3I", 7, 1, 0), CorruptFileError,
                                r"tensor has 7 dimensions .* at offset 36"),
    "ggml tensor past end": (b"tjgg" + struct.pack("<I7I", 3, 0, 64, 32, 4, 1, 16, 1)
                             + struct.pack("<3I1I", 1, 1, 0, 4096) + b"x" + b"\0" * 20, CorruptFileError,
                             r"'x' data \(16384 bytes at 64\) runs past the end"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_bad_input(tmp_path, case):
    data, error, pattern = CASES[case]
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    with pytest.raises(error, match=pattern) as info:
        ggml_backend.load(path)
    assert str(info.value).startswith(str(path) + ":")


def test_valid_minimal_gguf_with_tensor_loads(tmp_path):
    # The counterpart of the explicit cases: the same structures, well formed, load.
    path = tmp_path / "ok.gguf"
    values = np.arange(32, dtype=np.float32)
    write_gguf(path, {"general.architecture": "llama"}, [("t", "f32", (32,), values.view(np.uint8))])
    model = ggml_backend.load(path)
    assert np.array_equal(model.tensors["t"].data.view(np.float32), values)
    assert model.vocab is None and model.architecture == "llama"
