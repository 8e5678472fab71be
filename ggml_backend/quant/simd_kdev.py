"""Development copy of the K GEMM intrinsics (moved into simd.py before landing)."""
from llvmlite import ir
from numba.extending import intrinsic
from numba import types
from .simd import I8x64, I32x8, I32x16, F32x16, IsaType, _I16, _I32, _function, _lanewise, _splat, _splat_value


# ----------------------------------------------------------------------------------------------------------------
# The exact K-quant GEMM (gemm.py's ``gemm_k``): a super-block's integer sums in 16 int32 lanes, each 64 values'
# products taken in pairs (``vpmaddubsw``) and scaled by their group's six-bit scale (``vpdpwssd``); and the
# float work of 16 (row, token) pairs at once, one per lane.
# ----------------------------------------------------------------------------------------------------------------

@intrinsic
def scaled_dot_x64(typingctx, acc, unsigned, signed, scale_words, isa):
    """``acc + scale * (unsigned[4i] * signed[4i] + ... + unsigned[4i + 3] * signed[4i + 3])`` in each int32 lane i,
    ``scale`` the int16 in both halves of lane i of ``scale_words``: ``vpmaddubsw`` (pair sums in int16, exact while
    they stay within 32767: x + 128 up to 255 times quants of -64 .. 63) then ``vpdpwssd`` (AVX512-VNNI only)."""
    if (acc != I32x16 or unsigned != I8x64 or signed != I8x64 or scale_words != I32x16
            or not isinstance(isa, IsaType) or isa.isa_name != "avx512vnni"):
        return None

    def codegen(context, builder, sig, args):
        words = ir.VectorType(_I16, 32)
        maddubs = _function(builder, "llvm.x86.avx512.pmaddubs.w.512", words, [I8x64.llvm_type()] * 2)
        pairs = builder.call(maddubs, [args[1], args[2]])
        dpwssd = _function(builder, "llvm.x86.avx512.vpdpwssd.512", I32x16.llvm_type(),
                           [I32x16.llvm_type(), words, words])
        return builder.call(dpwssd, [args[0], pairs, builder.bitcast(args[3], words)])
    return I32x16(acc, unsigned, signed, scale_words, isa), codegen


@intrinsic
def dot_word_pairs_x16(typingctx, acc, a, b):
    """``acc + a.lo * b.lo + a.hi * b.hi`` in each int32 lane, ``lo``/``hi`` the lane's two int16 halves
    (``vpdpwssd``; AVX512-VNNI only)."""
    if acc != I32x16 or a != I32x16 or b != I32x16:
        return None

    def codegen(context, builder, sig, args):
        words = ir.VectorType(_I16, 32)
        dpwssd = _function(builder, "llvm.x86.avx512.vpdpwssd.512", I32x16.llvm_type(),
                           [I32x16.llvm_type(), words, words])
        return builder.call(dpwssd, [args[0], builder.bitcast(args[1], words), builder.bitcast(args[2], words)])
    return I32x16(acc, a, b), codegen


@intrinsic
def to_f32x16(typingctx, a):
    """float(a) lanewise of an ``I32x16`` (``vcvtdq2ps``: exact below 2 ** 24)."""
    if a != I32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], F32x16.llvm_type())
    return F32x16(a), codegen


mul_f32x16 = _lanewise(F32x16, "fmul")
mul_f32x16.__doc__ = "Lanewise ``a * b`` of two ``F32x16`` (rounded once: never fused with an add)."
add_f32x16 = _lanewise(F32x16, "fadd")
add_f32x16.__doc__ = "Lanewise ``a + b`` of two ``F32x16``."


@intrinsic
def scale_words_i32x8(typingctx, scales):
    """Each int32 lane of ``scales`` (a value within int16) as an int16 in both halves of the lane: the scale words
    of ``scaled_dot_x64``; an integer gives that word in all eight lanes."""
    if scales != I32x8 and not isinstance(scales, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        if sig.args[0] == I32x8:
            lanes = args[0]
        else:
            lanes = _splat_value(builder, context.cast(builder, args[0], sig.args[0], types.int32), 8)
        low = builder.and_(lanes, _splat(_I32(0xFFFF), 8))
        return builder.or_(low, builder.shl(low, _splat(_I32(16), 8)))
    return I32x8(scales), codegen
