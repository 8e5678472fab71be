"""Fills every row of the type table (``types.py``) with its traits: block decoder, dequantizer, reference
quantizer and product kernels. Importing ``ggml_backend.quant`` imports this module, so every row is complete
before anything multiplies or dequantizes; ``types.register`` refuses a row with an empty slot.

Adding a type: its row in ``types.py``, its ``unpack`` in ``blocks.py`` (and its layout drawn there), its
``to_float`` / ``from_float`` (``legacy.py`` / ``kquants.py`` or a module of its own), its kernels (a SIMD kind in
``decode.py``, a generic kernel in ``generic.py``), and one ``register`` call below.
"""
from __future__ import annotations

from . import blocks, floats, generic, kquants, layouts, legacy
from .decode import KINDS
from .float_dot import FLOAT_KINDS
from .types import MEMORY_ONLY, ProductKernel, float_kernel, register


def _kernel(name: str, generic_kernel) -> ProductKernel:
    return ProductKernel(simd_kind=KINDS[name], generic=generic_kernel)


# Plain floats: one value per "block"; multiplied by float_dot.py's kernels (sgemm without AVX2).
register("f32", unpack=blocks.f32, to_float=floats.dequantize_f32, from_float=floats.quantize_f32,
         one_token=float_kernel(FLOAT_KINDS["f32"]), few_tokens=float_kernel(FLOAT_KINDS["f32"]))
register("f16", unpack=blocks.half, to_float=floats.dequantize_f16, from_float=floats.quantize_f16,
         one_token=float_kernel(FLOAT_KINDS["f16"]), few_tokens=float_kernel(FLOAT_KINDS["f16"]))
register("bf16", unpack=blocks.bf16, to_float=floats.dequantize_bf16, from_float=floats.quantize_bf16,
         one_token=float_kernel(FLOAT_KINDS["bf16"]), few_tokens=float_kernel(FLOAT_KINDS["bf16"]))

# 32-value blocks.
register("q4_0", unpack=blocks.unpack_q4_0, to_float=legacy.dequantize_q4_0, from_float=legacy.quantize_q4_0,
         one_token=_kernel("q4_0", generic.one_token_q4_0), few_tokens=_kernel("q4_0", generic.few_tokens("q4_0")))
register("q4_1", unpack=blocks.unpack_q4_1, to_float=legacy.dequantize_q4_1, from_float=legacy.quantize_q4_1,
         one_token=_kernel("q4_1", generic.one_token_q4_1), few_tokens=_kernel("q4_1", generic.few_tokens("q4_1")))
register("q5_0", unpack=blocks.unpack_q5_0, to_float=legacy.dequantize_q5_0, from_float=legacy.quantize_q5_0,
         one_token=_kernel("q5_0", generic.one_token_q5_0), few_tokens=_kernel("q5_0", generic.few_tokens("q5_0")))
register("q5_1", unpack=blocks.unpack_q5_1, to_float=legacy.dequantize_q5_1, from_float=legacy.quantize_q5_1,
         one_token=_kernel("q5_1", generic.one_token_q5_1), few_tokens=_kernel("q5_1", generic.few_tokens("q5_1")))
register("q8_0", unpack=blocks.unpack_q8_0, to_float=legacy.dequantize_q8_0, from_float=legacy.quantize_q8_0,
         one_token=_kernel("q8_0", generic.one_token_q8_0), few_tokens=_kernel("q8_0", generic.few_tokens("q8_0")))
register("q8_1", unpack=blocks.unpack_q8_1, to_float=legacy.dequantize_q8_1, from_float=legacy.quantize_q8_1)

# 256-value super-blocks.
register("q2_K", unpack=blocks.unpack_q2_K, to_float=kquants.dequantize_q2_K, from_float=kquants.quantize_q2_K,
         one_token=_kernel("q2_K", generic.few_tokens("q2_K")), few_tokens=_kernel("q2_K", generic.few_tokens("q2_K")))
register("q3_K", unpack=blocks.unpack_q3_K, to_float=kquants.dequantize_q3_K, from_float=kquants.quantize_q3_K,
         one_token=_kernel("q3_K", generic.few_tokens("q3_K")), few_tokens=_kernel("q3_K", generic.few_tokens("q3_K")))
register(MEMORY_ONLY["q3_K_planes"], unpack=blocks.unpack_q3_K_planes, to_float=kquants.dequantize_q3_K_planes,
         from_float=layouts.quantize_q3_K_planes, one_token=_kernel("q3_K_planes", generic.few_tokens("q3_K_planes")),
         few_tokens=_kernel("q3_K_planes", generic.few_tokens("q3_K_planes")))
register("q4_K", unpack=blocks.unpack_q4_K, to_float=kquants.dequantize_q4_K, from_float=kquants.quantize_q4_K,
         one_token=_kernel("q4_K", generic.one_token_q4_K), few_tokens=_kernel("q4_K", generic.few_tokens("q4_K")))
register("q5_K", unpack=blocks.unpack_q5_K, to_float=kquants.dequantize_q5_K, from_float=kquants.quantize_q5_K,
         one_token=_kernel("q5_K", generic.few_tokens("q5_K")), few_tokens=_kernel("q5_K", generic.few_tokens("q5_K")))
register("q6_K", unpack=blocks.unpack_q6_K, to_float=kquants.dequantize_q6_K, from_float=kquants.quantize_q6_K,
         one_token=_kernel("q6_K", generic.one_token_q6_K), few_tokens=_kernel("q6_K", generic.few_tokens("q6_K")))
register("q8_K", unpack=blocks.unpack_q8_K, to_float=kquants.dequantize_q8_K, from_float=kquants.quantize_q8_K)
