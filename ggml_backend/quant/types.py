"""The one table of ggml tensor types: a type-traits row per type, as ggml's ``type_traits``.

A row holds what a type *is* (its ggml id, values and bytes per block, the block layout in words, the type the
activations are quantized to for dot products with it: llama.cpp's ``vec_dot_type``) and, once the kernel modules
are imported (``quant/traits.py`` registers them), what computes it:

    unpack       the scalar numba block decoder (blocks.py): integer quants + scales / mins + d / dmin; for the
                 plain float types, the numba reader of one value
    to_float     (uint8[n_bytes], out=None, parallel=True) -> float32[n_values]: dequantization, bit-exact
    from_float   (float32[n_values]) -> uint8[n_bytes]: ggml's reference quantizer (quantize_row_*_ref)
    one_token    the kernel of a product with one activation row (decode), and
    few_tokens   that of a few rows (below the BLAS path): each a ProductKernel, the SIMD kind of decode.py and
                 the generic kernel of generic.py (or ``float_kernel`` for the plain float types)

Every other part of the engine (readers, writers, dequantization, matrix products, ``info``) asks this table.
``register`` refuses a row with an empty slot, naming it, so a new type is one row here plus its kernels and one
``register`` call in ``traits.py`` (tests/test_quant_traits.py checks every row).

Names use llama.cpp's spelling: ``f32``, ``f16``, ``bf16``, ``q4_0`` … ``q8_1``, ``q2_K`` … ``q8_K``.
Lookups accept any case (``Q4_K``, ``q4_k``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class ProductKernel:
    """How weights of a type are multiplied with activation rows on the integer path."""
    simd_kind: Optional[int]   # decode.KINDS code of the explicit-SIMD kernel (CPUs with AVX2); None: none
    generic: Optional[Callable]  # the plain numba kernel (CPUs without AVX2): (w2d, acts, out, n_chunks) -> None
    sgemm: bool = False        # the plain float types: multiplied as float32 by the BLAS path (numpy's sgemm)
    float_kind: Optional[int] = None   # their SIMD kernel's storage code (float_dot.FLOAT_KINDS), CPUs with AVX2


def float_kernel(float_kind: int) -> ProductKernel:
    """The product kernel of f32 / f16 / bf16 weights (activations rounded to the weight's precision, as ggml does):
    ``float_dot.py``'s SIMD kernel of that storage on CPUs with AVX2, whatever the token count; elsewhere (and for
    ``method="blas"``) the BLAS path, sgemm on float32 bands."""
    return ProductKernel(simd_kind=None, generic=None, sgemm=True, float_kind=float_kind)

# The slots a complete row has; ``product slots`` are absent on the types ggml only uses for activations.
STORAGE_SLOTS = ("unpack", "to_float", "from_float")
PRODUCT_SLOTS = ("one_token", "few_tokens")


@dataclass
class QuantType:
    name: str                 # llama.cpp spelling, e.g. "q4_K"
    type_id: int              # ggml_type enum value (GGUF and GGML files store this)
    block_size: int           # values per block
    type_size: int            # bytes per block
    vec_dot_type: str         # type the activations are quantized to for dot products with this type
    layout: str = ""          # the block layout in words (blocks.py draws the bits)
    weights: bool = True      # False: an activation format only (q8_1, q8_K: ggml has no product with them)
    file_type: str = ""       # a layout no file holds (MEMORY_ONLY): the file type it re-lays; "" for file types
    # Filled in by traits.py through register():
    unpack: Optional[Callable] = field(default=None, repr=False)
    to_float: Optional[Callable] = field(default=None, repr=False)
    from_float: Optional[Callable] = field(default=None, repr=False)
    one_token: Optional[ProductKernel] = field(default=None, repr=False)
    few_tokens: Optional[ProductKernel] = field(default=None, repr=False)

    # The names the rest of the engine used before the row had its traits.
    @property
    def dequantize(self) -> Optional[Callable]:
        return self.to_float

    @property
    def quantize(self) -> Optional[Callable]:
        return self.from_float

    @property
    def required_slots(self) -> tuple[str, ...]:
        return STORAGE_SLOTS + (PRODUCT_SLOTS if self.weights else ())

    def missing_slots(self) -> list[str]:
        return [slot for slot in self.required_slots if getattr(self, slot) is None]

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
    QuantType("q8_1", 9, 32, 36, "q8_1", "d:f16, s:f16 (d*sum(qs)), qs:i8[32]", weights=False),
    QuantType("q2_K", 10, 256, 84, "q8_K", "scales:u8[16] (4-bit scale | 4-bit min), qs:u8[64] (2-bit), d:f16, dmin:f16"),
    QuantType("q3_K", 11, 256, 110, "q8_K", "hmask:u8[32], qs:u8[64] (low 2 bits), scales:u8[12] (6-bit), d:f16"),
    QuantType("q4_K", 12, 256, 144, "q8_K", "d:f16, dmin:f16, scales:u8[12] (6-bit scales+mins), qs:u8[128]"),
    QuantType("q5_K", 13, 256, 176, "q8_K", "d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]"),
    QuantType("q6_K", 14, 256, 210, "q8_K", "ql:u8[128], qh:u8[64], scales:i8[16], d:f16"),
    QuantType("q8_K", 15, 256, 292, "q8_K", "d:f32, qs:i8[256], bsums:i16[16]", weights=False),
    QuantType("bf16", 30, 1, 2, "bf16", "bfloat16 (upper half of a float32)"),
]

TYPES: dict[str, QuantType] = {row.name: row for row in _ROWS}
TYPES_BY_ID: dict[int, QuantType] = {row.type_id: row for row in _ROWS}

# Layouts no file holds: a loader re-lays a file type's blocks into one of these where this CPU's kernels run it
# faster (quant/layouts.py, on the AVX2 path); found by name only (no ggml id: -1), never read from or written to a
# file (readers look ids up in TYPES_BY_ID, writers read files; the GPU takes ``file_type``'s bytes back).
_MEMORY_ROWS = [
    QuantType("q3_K_planes", -1, 256, 110, "q8_K", "planes:u8[96] (3-bit quants, three planes), scales:u8[12] "
              "(q3_K's), d:f16", file_type="q3_K"),
]
MEMORY_ONLY: dict[str, QuantType] = {row.name: row for row in _MEMORY_ROWS}
_BY_LOWER = {row.name.lower(): row for row in _ROWS + _MEMORY_ROWS}

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


class IncompleteTypeError(ValueError):
    """A type registered without one of the slots of its row."""


def register(name, *, unpack: Callable | None = None, to_float: Callable | None = None,
             from_float: Callable | None = None, one_token: ProductKernel | None = None,
             few_tokens: ProductKernel | None = None) -> QuantType:
    """Fill a row's slots, all at once: a row with an empty slot is refused (``IncompleteTypeError`` naming the
    slot) and left as it was. ``name``: a type of the table, or a ``QuantType`` (a new row, not yet in the table).
    Returns the row."""
    row = name if isinstance(name, QuantType) else get_type(name)
    given = dict(unpack=unpack, to_float=to_float, from_float=from_float, one_token=one_token,
                 few_tokens=few_tokens)
    missing = [slot for slot in row.required_slots if given[slot] is None]
    if missing:
        raise IncompleteTypeError(f"type {row.name}: no {', '.join(missing)} given; a type's row needs "
                                  f"{', '.join(row.required_slots)}")
    for slot in PRODUCT_SLOTS:
        kernel = given[slot]
        if kernel is not None and not isinstance(kernel, ProductKernel):
            raise IncompleteTypeError(f"type {row.name}: {slot} must be a ProductKernel, got {type(kernel).__name__}")
        if kernel is not None and not kernel.sgemm and kernel.generic is None:
            raise IncompleteTypeError(f"type {row.name}: {slot} has no generic kernel (CPUs without AVX2 run it)")
    for slot, value in given.items():
        setattr(row, slot, value)
    return row
