"""Weights re-laid at load (quant/layouts.py): q3_K's planes on the 256-bit SIMD paths give q3_K's numbers bit for
bit, in the kernels, in dequantization and in a real model's logits (its compiled decode step still taken), and the
loader re-lays in place without writing the file."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import ggml_backend.quant.matmul as matmul_module
from ggml_backend.quant import kquants, layouts, simd
from ggml_backend.quant.layouts import file_layout, relaid, run_layout
from ggml_backend.quant.matmul import matmul, matmul_many, WeightMatrix
from ggml_backend.quant.types import MEMORY_ONLY, TYPES_BY_ID, get_type

from refdata import synthetic_file
from test_decode_kernels import path_param  # noqa: E402

PLANES = MEMORY_ONLY["q3_K_planes"]


def q3_K_blocks(n_rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_rows, k)) * rng.uniform(0.2, 2.0, (n_rows, 1))).astype(np.float32)
    return kquants.quantize_q3_K(w).reshape(n_rows, -1)


def test_the_planes_hold_q3_K_byte_for_byte():
    rng = np.random.default_rng(1)
    quantized = q3_K_blocks(3, 512)
    random = rng.integers(0, 256, (7, 110 * 4), dtype=np.uint8)
    for data in (quantized, random):
        planes = layouts.q3_K_to_planes(data)
        assert planes.shape == (data.size,) and not np.array_equal(planes, data.reshape(-1))
        assert np.array_equal(layouts.q3_K_from_planes(planes), data.reshape(-1))
        # the same values (bit patterns: random halves include NaN), scales and d at q3_K's offsets
        same = get_type("q3_K").to_float(data.reshape(-1)).view(np.uint32)
        assert np.array_equal(PLANES.to_float(planes).view(np.uint32), same)
        assert np.array_equal(planes.reshape(-1, 110)[:, 96:], data.reshape(-1, 110)[:, 96:])
    # the layout drawn in blocks.py: value 32 g + l of group g, three-bit quant q (low bits | third bit << 2)
    one = np.zeros(110, np.uint8)
    one[0] = 1 << 6                          # hmask byte 0: the third bit of value 6 * 32 (group 6)
    one[32 + 32] = 3 << 4                    # qs of the second half, byte 0: group 6's low bits (its j = 2)
    planes = layouts.q3_K_to_planes(one)
    assert planes[0] == 3 << 6 and planes[32] == 1 << 6 and planes[64] == 0
    assert np.array_equal(layouts.q3_K_from_planes(planes), one)
    with pytest.raises(ValueError, match="110 bytes"):
        layouts.q3_K_to_planes(np.zeros(109, np.uint8))


def test_the_layout_is_memory_only_and_its_quantizer_gives_q3_K_blocks():
    assert PLANES.file_type == "q3_K" and PLANES.type_id not in TYPES_BY_ID
    assert get_type("Q3_K_PLANES") is PLANES
    with pytest.raises(ValueError, match="not supported"):
        get_type(-1)
    x = np.random.default_rng(2).standard_normal(512).astype(np.float32)
    assert np.array_equal(layouts.q3_K_from_planes(PLANES.from_float(x)), get_type("q3_K").from_float(x))
    row, back = file_layout(PLANES, PLANES.from_float(x))           # what the GPU takes at upload
    assert row.name == "q3_K" and np.array_equal(back, get_type("q3_K").from_float(x))
    assert file_layout("q4_K", back)[1] is back


def _on(isa, fn):
    saved = matmul_module.KERNEL_ISA
    matmul_module.KERNEL_ISA = isa
    try:
        return fn()
    finally:
        matmul_module.KERNEL_ISA = saved


def test_which_paths_re_lay(monkeypatch):
    for isa in (simd.AVX2, simd.AVXVNNI, simd.AVX512VNNI):
        assert _on(isa, lambda: run_layout("q3_K")) is PLANES
    assert _on(None, lambda: run_layout("q3_K")).name == "q3_K"                # the generic kernels
    assert _on(simd.AVX2, lambda: run_layout("q4_K")).name == "q4_K"
    monkeypatch.setenv(layouts.ENV, "0")
    assert _on(simd.AVX2, lambda: run_layout("q3_K")).name == "q3_K"
    monkeypatch.setenv(layouts.ENV, "yes")
    with pytest.raises(ValueError, match="GGML_BACKEND_RELAYOUT must be 0 or 1"):
        _on(simd.AVX2, lambda: run_layout("q3_K"))


PATHS = [path_param(isa) for isa in (simd.AVX512VNNI, simd.AVXVNNI, simd.AVX2)] + [pytest.param(None, id="generic")]


@pytest.mark.parametrize("isa", PATHS)
def test_the_planes_give_q3_K_bits_on_every_path(isa):
    """One token, a tile of a few, the prompt GEMM and the BLAS path's dequantized bands; a fused launch of two."""
    w = q3_K_blocks(37, 768, seed=3)
    planes = layouts.q3_K_to_planes(w).reshape(w.shape)
    rng = np.random.default_rng(4)
    for n_tokens, methods in ((1, ("int",)), (5, ("int",)), (20, ("int", "blas") + (("gemm",) if isa else ()))):
        x = rng.standard_normal((n_tokens, 768)).astype(np.float32)
        for method in methods:
            a, b = (_on(isa, lambda name=name, data=data: matmul(name, data, x, method=method))
                    for name, data in (("q3_K", w), ("q3_K_planes", planes)))
            assert np.array_equal(a, b), (n_tokens, method)
    x = rng.standard_normal((1, 768)).astype(np.float32)
    fused = _on(isa, lambda: matmul_many([WeightMatrix("q3_K_planes", planes)] * 2, x))
    alone = _on(isa, lambda: matmul("q3_K", w, x))
    assert len(fused) == 2 and all(np.array_equal(y, alone) for y in fused)


@pytest.mark.parametrize("in_memory", [False, True])
def test_the_loader_re_lays_in_place_and_leaves_the_file_as_it_was(monkeypatch, in_memory):
    """The synthetic q3_K_M file, mapped copy-on-write or read into memory: its q3_K matrices re-laid in place (the
    one byte array stays one), their entries typed q3_K_planes, again idempotent; the file on disk unchanged."""
    from ggml_backend.formats import load
    path = synthetic_file("q3_K_M")
    before = path.read_bytes()
    model_file = load(path, in_memory=in_memory)
    name = next(n for n, t in model_file.tensors.items() if t.type.name == "q3_K" and n != "token_embd.weight")
    tensor = model_file.tensors[name]
    original = tensor.data.copy()
    relaid_entry = _on(simd.AVX2, lambda: layouts.relaid_tensor(model_file.tensors, name))
    assert relaid_entry is model_file.tensors[name] and relaid_entry.type is PLANES
    assert np.shares_memory(relaid_entry.data, model_file.mmap) and not relaid_entry.data.flags.writeable
    assert np.array_equal(relaid_entry.data, layouts.q3_K_to_planes(original))
    assert _on(simd.AVX2, lambda: layouts.relaid_tensor(model_file.tensors, name)) is relaid_entry   # once
    assert path.read_bytes() == before
    assert np.array_equal(np.memmap(path, dtype=np.uint8, mode="r")[tensor.offset:tensor.offset + tensor.nbytes],
                          original)
    # short of memory for the written pages (they could not be paged out as the file's can): the file layout
    other = next(n for n, t in model_file.tensors.items() if t.type.name == "q3_K" and n not in (name,
                                                                                                  "token_embd.weight"))
    monkeypatch.setattr(layouts, "available_memory", lambda: layouts.SPARE_MIN)
    assert _on(simd.AVX2, lambda: layouts.relaid_tensor(model_file.tensors, other)).type.name == "q3_K"
    # bytes that cannot be written (a read-only mapping) keep their layout
    monkeypatch.undo()
    read_only = {other: dataclasses.replace(model_file.tensors[other],
                                            data=np.memmap(path, dtype=np.uint8, mode="r")[:110])}
    assert _on(simd.AVX2, lambda: layouts.relaid_tensor(read_only, other)).type.name == "q3_K"
    assert relaid("q4_K", original)[1] is original


def test_a_q3_K_model_gives_the_same_logits_re_laid(monkeypatch):
    """The synthetic q3_K_M model (llama.cpp's logits are compared in test_engine_synthetic): re-laid on this CPU's
    256-bit path, every q3_K matrix runs as planes, and the logits of a prompt and of decode steps are the file
    layout's bit for bit."""
    from ggml_backend import Llama
    if matmul_module.KERNEL_ISA is None:
        pytest.skip("this CPU runs the generic kernels, which keep q3_K's layout")
    path = str(synthetic_file("q3_K_M"))
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(layouts.ENV, flag)
        llm = Llama(path, n_ctx=64, verbose=False)
        types = {getattr(llm.model.layers[0], name).qtype.name for name in ("wq", "wk", "wv", "wo", "w_gate",
                                                                            "w_up", "w_down")}
        assert llm.model.fused_decode is not None         # every weight still in one byte array
        if flag == "1":
            assert "q3_K_planes" in types and "q3_K" not in types, types
        else:
            assert "q3_K" in types and "q3_K_planes" not in types, types
        llm.eval(list(range(10, 30)))
        rows = [llm.session.last_logits.copy()]
        for token in (5, 6, 7):
            llm.eval([token])
            rows.append(llm.session.last_logits.copy())
        results[flag] = rows
    assert all(np.array_equal(a, b) for a, b in zip(results["1"], results["0"]))
