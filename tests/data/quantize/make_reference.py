"""Regenerate tests/data/quantize/llamacpp.npz: llama.cpp's own quantization of fixed float32 inputs.

    python tests/data/quantize/make_reference.py      (needs llama-cpp-python; writes next to this file)

Bytes come from ggml_quantize_chunk in llama-cpp-python's libggml-base (tests/llamacpp_quantize.py), importance
matrix NULL (q8_1 and q8_K, which only activations use, from quantize_row_q8_1_ref / _q8_K_ref), the path llama_model_quantize takes without one (quantize_row_*_ref). The inputs are stored beside
them, so tests/test_quant_reference.py needs neither llama_cpp nor a stable random generator. Arrays:

  inputs               float32 [ROWS, 512]: crafted awkward blocks, then seeded random rows of many shapes
  TYPE                 uint8: llama.cpp's bytes of ``inputs`` as TYPE, for every type in TYPES
  model_TYPE           uint8: llama.cpp's re-quantization to TYPE of the first 16 rows of a TYPE tensor of the
                       synthetic tiny Llama (tests/data/synthetic), dequantized to float32
  model_tensors        str: "TYPE=file:tensor" for each of the above, where the rows came from
  ggml_version         str: the library that made the bytes
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent.parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from ggml_backend import load, quant  # noqa: E402
from llamacpp_quantize import available, ggml_quantize, version  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K"]
ROW_LEN = 512
# (type, synthetic file in tests/data/synthetic): a tensor of that type whose rows are re-quantized
MODEL_TENSORS = [("q2_K", "tiny-llama-q2_K.gguf"), ("q3_K", "tiny-llama-q3_K_M.gguf"),
                 ("q4_K", "tiny-llama-q4_K_M.gguf"), ("q5_K", "tiny-llama-q5_K_M.gguf"),
                 ("q6_K", "tiny-llama-q4_K_M.gguf")]


def crafted_rows() -> np.ndarray:
    """Blocks that break careless quantizers (each row: 2 super-blocks, 16 legacy blocks)."""
    rng = np.random.default_rng(2024)
    x = (rng.standard_normal((16, ROW_LEN)) * rng.exponential(1.0, (16, 1))).astype(np.float32)
    x[0] = 0.0                                        # all zeros
    x[1, :32] = 0.0
    x[1, 5] = 1e-30                                   # a lone tiny value: scales underflow to zero halves
    x[1, 256:288] = 1.0
    x[1, 256] = 1e-30
    x[2, 7] = 3.0e4                                   # one huge value dominating its block
    x[3, :32] = -np.abs(x[3, :32])                    # negative maxima
    x[3, 40] = -1000.0
    x[3, 256:] = -np.abs(x[3, 256:])
    x[4, :] = 2.5                                     # constant blocks: max == min
    x[4, 256:] = -2.5
    x[5, :32] = np.arange(32) - 16.0                  # exact grid points, rounding ties
    x[5, 256:] = np.repeat(np.arange(-8, 8), 16) / 8.0
    x[6, :32] = 0.5
    x[6, 9] = -0.5                                    # +max and -max tie in magnitude: the first wins
    x[6, 256:] = np.where(np.arange(256) % 2, 0.75, -0.75)
    x[7, :256] = np.linspace(-1, 1, 256)
    x[7, 256:] = np.linspace(0, 1, 256) ** 3          # all non-negative: min clamps to 0
    x[8] *= 1e-6                                      # tiny scales (subnormal halves)
    x[9, :64] = rng.integers(-127, 128, 64) / 127.0   # values on q8 half-steps
    x[10, 100] = -7e4                                 # a scale beyond the half range (inf d, as in ggml)
    x[10, 300] = 1e7                                  # a q3_K/q6_K super-block scale beyond the half range
    x[11, :256] = 1e-39                               # subnormal float32 values: 1/d overflows to inf
    x[11, 3] = -2e-39
    x[11, 256:] = 1e-45 * rng.integers(-3, 4, 256)
    x[12, :] = np.float32(3e38) * np.sign(rng.standard_normal(ROW_LEN))   # max - min overflows
    x[13, :] = rng.standard_normal(ROW_LEN) * 1e30
    x[13, 256:] *= 10.0 ** rng.integers(-60, 1, 256)                      # magnitudes 1e-30 .. 1e30 in one block
    x[14, :] = np.where(rng.random(ROW_LEN) < 0.05, rng.standard_normal(ROW_LEN), 0.0)   # sparse
    x[15, :] = rng.standard_cauchy(ROW_LEN)                                # heavy tails
    return x


def random_rows(count: int, seed: int) -> np.ndarray:
    """Seeded random rows of many shapes (the generator of the wider comparison in the tests)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        scale = 10.0 ** rng.uniform(-8, 8)
        kind = i % 6
        if kind == 0:
            row = rng.standard_normal(ROW_LEN)
        elif kind == 1:
            row = np.round(rng.standard_normal(ROW_LEN) * 4) / 4        # many ties
        elif kind == 2:
            row = rng.integers(-8, 8, ROW_LEN).astype(np.float64)        # exact grids
        elif kind == 3:
            row = np.abs(rng.standard_normal(ROW_LEN))                    # one-signed
        elif kind == 4:
            row = rng.standard_normal(ROW_LEN) * 10.0 ** rng.integers(-6, 6, ROW_LEN)   # mixed magnitudes
        else:
            row = rng.laplace(size=ROW_LEN)
        rows.append(row * scale)
    return np.clip(np.array(rows), -3e38, 3e38).astype(np.float32)


def model_rows(type_name: str, file_name: str) -> tuple[str, np.ndarray]:
    model = load(str(TESTS / "data" / "synthetic" / file_name))
    for name, tensor in model.tensors.items():
        if quant.get_type(tensor.type).name == type_name and tensor.shape[-1] == 256:
            return name, tensor.dequantize().reshape(-1, 256)[:16].copy()
    raise SystemExit(f"no {type_name} tensor with rows of 256 in {file_name}")


def main() -> None:
    ok, why = available()
    if not ok:
        raise SystemExit(f"llama.cpp's quantizer is not available: {why}")
    inputs = np.concatenate([crafted_rows(), random_rows(16, seed=7)])
    arrays = {"inputs": inputs, "ggml_version": np.array(version())}
    with np.errstate(all="ignore"):
        for name in TYPES:
            arrays[name] = ggml_quantize(name, inputs)
    where = []
    for type_name, file_name in MODEL_TENSORS:
        tensor_name, rows = model_rows(type_name, file_name)
        arrays[f"model_{type_name}"] = ggml_quantize(type_name, rows)
        where.append(f"{type_name}={file_name}:{tensor_name}")
    arrays["model_tensors"] = np.array(where)
    out = HERE / "llamacpp.npz"
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size:,} bytes) from {version()}")


if __name__ == "__main__":
    main()
