"""The one table of ggml tensor types.

Each type is one row: its ggml id, how many values one block holds, how many bytes that block takes, and which
type activations are quantized to when a row of this type is multiplied with them (llama.cpp's ``vec_dot_type``).
Every other part of the engine (readers, writers, dequantization, matrix products, ``info``) asks this table.

Kernels register themselves onto the rows (``dequantize``, ``quantize``) from the modules that define them, so a
new type touches ``quant/`` only: one row here, plus its kernels.

Names use llama.cpp's spelling: ``f32``, ``f16``, ``bf16``, ``q4_0`` … ``q8_1``, ``q2_K`` … ``q8_K``.
Lookups accept any case (``Q4_K``, ``q4_k``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class QuantType:
    name: str                 # llama.cpp spelling, e.g. "q4_K"
    type_id: int              # ggml_type enum value (GGUF and GGML files store this)
    block_size: int           # values per block
    type_size: int            # bytes per block
    vec_dot_type: str         # type the activations are quantized to for dot products with this type
    layout: str = ""          # the block layout in words (for readers of the code)
    # Filled in by the modules that implement the type (see register()):
    dequantize: Optional[Callable] = field(default=None, repr=False)  # (uint8[n_bytes]) -> float32[n_values]
    quantize: Optional[Callable] = field(default=None, repr=False)    # (float32[n_values]) -> uint8[n_bytes]

    def row_bytes(self, n_values: int) -> int:
        """Bytes taken by ``n_values`` values (which must be a whole number of blocks)."""
        if n_values % self.block_size:
            raise ValueError(f"{n_values} values are not a whole number of {self.name} blocks of {self.block_size}")
        return n_values // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


_ROWS = [
    # name    id  block bytes vec_dot  layout
    QuantType("f32", 0, 1, 4, "f32", "float32"),
    QuantType("f16", 1, 1, 2, "f16", "float16"),
    QuantType("q4_0", 2, 32, 18, "q8_0", "d:f16, qs:u8[16] (low nibbles = values 0..15, high = 16..31), v = (q-8)*d"),
    QuantType("q4_1", 3, 32, 20, "q8_1", "d:f16, m:f16, qs:u8[16], v = q*d + m"),
    QuantType("q5_0", 6, 32, 22, "q8_0", "d:f16, qh:u32 (5th bits), qs:u8[16], v = (q-16)*d"),
    QuantType("q5_1", 7, 32, 24, "q8_1", "d:f16, m:f16, qh:u32, qs:u8[16], v = q*d + m"),
    QuantType("q8_0", 8, 32, 34, "q8_0", "d:f16, qs:i8[32], v = q*d"),
    QuantType("q8_1", 9, 32, 36, "q8_1", "d:f16, s:f16 (d*sum(qs)), qs:i8[32]"),
    QuantType("q2_K", 10, 256, 84, "q8_K", "scales:u8[16] (4-bit scale | 4-bit min), qs:u8[64] (2-bit), d:f16, dmin:f16"),
    QuantType("q3_K", 11, 256, 110, "q8_K", "hmask:u8[32], qs:u8[64] (low 2 bits), scales:u8[12] (6-bit), d:f16"),
    QuantType("q4_K", 12, 256, 144, "q8_K", "d:f16, dmin:f16, scales:u8[12] (6-bit scales+mins), qs:u8[128]"),
    QuantType("q5_K", 13, 256, 176, "q8_K", "d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]"),
    QuantType("q6_K", 14, 256, 210, "q8_K", "ql:u8[128], qh:u8[64], scales:i8[16], d:f16"),
    QuantType("q8_K", 15, 256, 292, "q8_K", "d:f32, qs:i8[256], bsums:i16[16]"),
    QuantType("bf16", 30, 1, 2, "bf16", "bfloat16 (upper half of a float32)"),
]

TYPES: dict[str, QuantType] = {row.name: row for row in _ROWS}
TYPES_BY_ID: dict[int, QuantType] = {row.type_id: row for row in _ROWS}
_BY_LOWER = {row.name.lower(): row for row in _ROWS}

# ggml type ids that exist in ggml but that this engine does not compute (IQ formats, TQ, MXFP4, ...);
# readers name them in their error instead of calling them garbage.
KNOWN_UNSUPPORTED_IDS = {
    4: "q4_2 (removed from ggml in 2023)", 5: "q4_3 (removed from ggml in 2023)",
    16: "iq2_xxs", 17: "iq2_xs", 18: "iq3_xxs", 19: "iq1_s", 20: "iq4_nl", 21: "iq3_s", 22: "iq2_s",
    23: "iq4_xs", 24: "i8", 25: "i16", 26: "i32", 27: "i64", 28: "f64", 29: "iq1_m",
    34: "tq1_0", 35: "tq2_0", 39: "mxfp4",
}


def get_type(key) -> QuantType:
    """Look a type up by name (any case), by ggml id, or pass a QuantType through."""
    if isinstance(key, QuantType):
        return key
    if isinstance(key, (int,)) and not isinstance(key, bool):
        try:
            return TYPES_BY_ID[key]
        except KeyError:
            what = KNOWN_UNSUPPORTED_IDS.get(key, "unknown")
            raise ValueError(f"ggml type id {key} ({what}) is not supported") from None
    try:
        return _BY_LOWER[str(key).lower()]
    except KeyError:
        raise ValueError(f"unknown ggml type {key!r}; known: {', '.join(TYPES)}") from None


def register(name: str, *, dequantize: Callable | None = None, quantize: Callable | None = None) -> None:
    """Attach kernels to a row of the table (called by the modules that implement them)."""
    row = get_type(name)
    if dequantize is not None:
        row.dequantize = dequantize
    if quantize is not None:
        row.quantize = quantize
