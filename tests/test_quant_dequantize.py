"""Dequantization equals gguf-py's (and so ggml's reference C) bit for bit, on every tensor of the synthetic
reference models and on samples of the real Qwen and Gemma files; and the public API validates its input."""
from __future__ import annotations

import glob
import math
import os
import struct


import numpy as np
import pytest

from ggml_backend import quant
from refdata import SYNTHETIC_DIR, full_synthetic_set

gguf = pytest.importorskip("gguf", reason="gguf (gguf-py, a dev dependency) writes the reference files these tests compare with")
from gguf import GGUFReader  # noqa: E402

SYNTHETIC = sorted(glob.glob(str(SYNTHETIC_DIR / "*.gguf")))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def oracle(raw: np.ndarray, type_id: int, shape) -> np.ndarray:
    """gguf-py's dequantization of a tensor's bytes."""
    rows = raw.reshape(math.prod(shape[:-1]), -1)
    return np.asarray(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(type_id)),
                      dtype=np.float32).reshape(shape)


# ------------------------------------------------------------------ a minimal GGUF tensor index
# gguf-py's reader takes 5-40 s on the real files' big vocabularies; the tensor table alone is quick to read.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}


def gguf_tensor_index(path: str) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """{name: (ggml type id, shape with the row length last, absolute byte offset)} of a GGUF v2/v3 file."""
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # the header of the real files is a few MB
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def skip_value(value_type):
        nonlocal pos
        if value_type == 8:  # string
            length = take("<Q")
            pos += length
        elif value_type == 9:  # array
            item_type, count = take("<I"), take("<Q")
            if item_type in _SCALAR_FORMATS:
                pos += struct.calcsize(_SCALAR_FORMATS[item_type]) * count
            else:
                for _ in range(count):
                    skip_value(item_type)
        else:
            pos += struct.calcsize(_SCALAR_FORMATS[value_type])

    assert buf[:4] == b"GGUF"
    pos = 4
    take("<I")  # version
    n_tensors, n_kv = take("<Q"), take("<Q")
    alignment = 32
    for _ in range(n_kv):
        length = take("<Q")
        key = buf[pos:pos + length].decode()
        pos += length
        value_type = take("<I")
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", buf, pos)[0]
        skip_value(value_type)
    infos = {}
    for _ in range(n_tensors):
        length = take("<Q")
        name = buf[pos:pos + length].decode()
        pos += length
        dims = [take("<Q") for _ in range(take("<I"))]
        type_id, offset = take("<I"), take("<Q")
        infos[name] = (type_id, tuple(reversed(dims)), offset)
    data_start = (pos + alignment - 1) // alignment * alignment
    return {name: (t, shape, data_start + off) for name, (t, shape, off) in infos.items()}


# ------------------------------------------------------------------ synthetic models: every tensor

@pytest.mark.parametrize("path", SYNTHETIC, ids=lambda p: os.path.basename(p))
def test_every_synthetic_tensor_matches_gguf_py(path):
    reader = GGUFReader(path)
    assert reader.tensors
    index = gguf_tensor_index(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        type_id, index_shape, offset = index[tensor.name]
        assert (type_id, index_shape) == (int(tensor.tensor_type), shape)
        raw = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        assert offset == tensor.data_offset
        from_file = mapped[offset:offset + raw.size]  # a read-only memmap slice, as the engine passes
        ours = quant.dequantize(type_id, from_file, shape)
        assert ours.dtype == np.float32 and ours.shape == shape
        assert same_bits(ours, oracle(raw, type_id, shape)), f"{tensor.name} ({tensor.tensor_type.name})"


def test_synthetic_files_cover_every_weight_type():
    if not full_synthetic_set():
        pytest.skip(reason="only a subset of the synthetic files is in this checkout (tests/data); the full set is in "
                    "the workplace's shared/reference")
    types = set()
    for path in SYNTHETIC:
        types |= {int(t) for t, _, _ in gguf_tensor_index(path).values()}
    names = {quant.get_type(t).name for t in types}
    assert {"f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
            "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"} <= names


# ------------------------------------------------------------------ real models: samples of each type

def _real_model_paths():
    from ggml_backend.default_model import default_model_path, gemma_model_path
    paths = []
    for find in (default_model_path, gemma_model_path):
        try:
            paths.append(str(find()))
        except Exception as error:  # not installed here: the test below skips
            paths.append(error)
    return paths


@pytest.fixture(scope="module")
def real_models():
    found = [p for p in _real_model_paths() if isinstance(p, str) and os.path.exists(p)]
    if not found:
        pytest.skip(reason="the real model files are not available")
    return {p: (gguf_tensor_index(p), np.memmap(p, dtype=np.uint8, mode="r")) for p in found}


def test_real_model_samples_match_gguf_py(real_models):
    checked = set()
    for path, (index, mapped) in real_models.items():
        by_type: dict[int, list] = {}
        for name, (type_id, shape, offset) in index.items():
            by_type.setdefault(type_id, []).append((math.prod(shape), name, shape, offset))
        for type_id, tensors in by_type.items():
            qtype = quant.get_type(type_id)
            tensors.sort()
            # the two smallest tensors of the type, and the first 64 rows of the largest
            picks = [(name, shape, offset) for _, name, shape, offset in tensors[:2]]
            _, name, shape, offset = tensors[-1]
            picks.append((name + "[:64]", (min(64, math.prod(shape[:-1])), shape[-1]), offset))
            for name, shape, offset in picks:
                n_bytes = qtype.row_bytes(shape[-1]) * math.prod(shape[:-1])
                raw = mapped[offset:offset + n_bytes]
                ours = quant.dequantize(qtype, raw, shape)
                assert same_bits(ours, oracle(np.asarray(raw), type_id, shape)), f"{path}: {name}"
                assert np.isfinite(ours).all()
            checked.add(qtype.name)
    assert {"q5_0", "q8_0", "q4_K", "q6_K", "f32"} <= checked


def test_qwen_token_embedding_rows_match(real_models):
    qwen = [p for p in real_models if "qwen" in os.path.basename(p)]
    if not qwen:
        pytest.skip(reason="the Qwen model file is not available")
    index, mapped = real_models[qwen[0]]
    type_id, shape, offset = index["token_embd.weight"]
    qtype = quant.get_type(type_id)
    assert qtype.name == "q5_0" and shape == (151936, 896)
    row_bytes = qtype.row_bytes(shape[-1])
    data = mapped[offset:offset + row_bytes * shape[0]]
    table = quant.dequantize(qtype, data, shape)
    ids = [0, 151935, 42, 42, 100000]
    rows = quant.dequantize_rows(qtype, data.reshape(shape[0], row_bytes), ids)
    assert rows.shape == (5, 896) and same_bits(rows, table[ids])
    assert same_bits(rows[:1], oracle(np.asarray(data[:row_bytes]), type_id, (1, 896)))


# ------------------------------------------------------------------ API: validation and shapes

def test_dequantize_accepts_names_ids_and_types_and_keeps_shape():
    raw = quant.quantize("q8_0", np.arange(128, dtype=np.float32).reshape(2, 2, 32))
    by_name = quant.dequantize("Q8_0", raw, (2, 2, 32))
    by_id = quant.dequantize(8, raw, (2, 2, 32))
    by_type = quant.dequantize(quant.get_type("q8_0"), raw.tobytes(), [2, 2, 32])
    assert by_name.shape == (2, 2, 32)
    assert same_bits(by_name, by_id) and same_bits(by_name, by_type)
    assert by_name[1, 1, 31] == pytest.approx(127.0, rel=1e-3)


def test_dequantize_rejects_wrong_sizes_before_any_kernel_runs():
    raw = np.zeros(18 * 4, dtype=np.uint8)
    with pytest.raises(ValueError, match="needs"):
        quant.dequantize("q4_0", raw[:-1], (4, 32))
    with pytest.raises(ValueError, match="needs"):
        quant.dequantize("q4_0", raw, (8, 32))
    with pytest.raises(ValueError, match="whole number"):
        quant.dequantize("q4_0", raw, (1, 48))
    with pytest.raises(ValueError, match="uint8"):
        quant.dequantize("q4_0", raw.view(np.int8), (4, 32))
    with pytest.raises(ValueError, match="not supported"):
        quant.dequantize(20, raw, (4, 32))  # iq4_nl
    with pytest.raises(ValueError, match="unknown"):
        quant.dequantize("q9_9", raw, (4, 32))
    assert quant.dequantize("q4_0", raw, (4, 32)).shape == (4, 32)


def test_dequantize_rows_validates_row_ids_and_layout():
    values = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32)
    matrix = quant.quantize("q4_1", values).reshape(6, -1)
    full = quant.dequantize("q4_1", matrix.reshape(-1), (6, 256))
    assert same_bits(quant.dequantize_rows("q4_1", matrix, np.array([5, 0, 5])), full[[5, 0, 5]])
    assert quant.dequantize_rows("q4_1", matrix, []).shape == (0, 256)
    with pytest.raises(ValueError, match="out of range"):
        quant.dequantize_rows("q4_1", matrix, [6])
    with pytest.raises(ValueError, match="out of range"):
        quant.dequantize_rows("q4_1", matrix, [-1])
    with pytest.raises(ValueError, match="integers"):
        quant.dequantize_rows("q4_1", matrix, [1.5])
    with pytest.raises(ValueError, match="whole number"):
        quant.dequantize_rows("q4_1", matrix[:, :-1], [0])
    with pytest.raises(ValueError, match="2-D"):
        quant.dequantize_rows("q4_1", matrix.reshape(-1), [0])
