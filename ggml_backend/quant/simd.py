"""Explicit SIMD for numba kernels: LLVM vector values carried in ordinary numba variables.

LLVM does not vectorize our plain block loops (it unrolls a 32-weight block into scalar byte loads and multiplies:
shared/notes/numba-simd.md measured 1 GB/s per core against 16 GB/s for explicit SIMD). The functions here are
numba ``@intrinsic``s that emit LLVM IR directly, so a kernel reads like ggml's AVX code:

    w = unpack_nibbles(load_16_bytes(row, offset))          # 32 weights 0..15 as a <32 x i8>
    dot = dot_u8_i8(load_8_i32(bias, 8 * b), w, load_32_bytes(x, 32 * b), isa)   # <8 x i32>
    acc = fma_f32x8(acc, to_f32x8(dot), load_f16(row, offset - 2) * x_scale[b])  # <8 x float>

Vector types: ``I8x32`` (weights, activations), ``I32x8`` (integer dot products, four bytes per lane),
``F32x8`` (float accumulators). Which x86 instructions compute ``dot_u8_i8`` (unsigned bytes times signed bytes,
summed in groups of four into int32 lanes) is the kernel's ``isa`` argument, an ``Isa`` object whose numba type is
part of the compiled signature: every instruction-set path has its own compiled (and cached) kernel, so a process
can run and compare all the paths its CPU supports, and forcing a path can never pick up another path's cache.

These intrinsics read memory without bounds checks: the callers (quant/decode.py) check every size in Python
before a kernel runs.

numba's on-disk cache keys a kernel on the text of its own source file only; decode.py keeps a digest of this
file beside its cache and drops its cached kernels when this file changes.
"""
from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.core.imputils import lower_constant
from numba.extending import NativeValue, intrinsic, register_model, typeof_impl, unbox

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


# ----------------------------------------------------------------------------------------------------------------
# Instruction sets
# ----------------------------------------------------------------------------------------------------------------

class Isa:
    """An instruction-set path of the SIMD kernels (a compile-time constant of each kernel).

    ``avx512vnni``: ``vpdpbusd`` on 256-bit vectors (AVX512-VNNI + VL: Intel Ice Lake and later, AMD Zen 4), and
    512-bit registers where a kernel has a wide form (sixteen row lanes, q2_K's wide groups, the prompt GEMM);
    ``avxvnni``: the same 256-bit ``vpdpbusd`` / ``vpdpwssd`` (AVX-VNNI, VEX-encoded: Intel Alder Lake and later
    client CPUs, Sierra Forest Xeons: AVX2 without AVX-512), the narrow forms of every kernel;
    ``avx2``: ``vpmaddubsw`` + ``vpmaddwd`` (every x86-64 CPU with AVX2 and FMA)."""

    def __init__(self, name: str, needs: tuple[str, ...], vnni: bool, wide: bool):
        self.name = name
        self.needs = needs     # LLVM feature names the CPU must have
        self.vnni = vnni       # 256-bit ``vpdpbusd`` / ``vpdpwssd`` (AVX512-VNNI with VL, or AVX-VNNI)
        self.wide = wide       # 512-bit registers: the kernels' wide forms
        self._type = None

    @property
    def _numba_type_(self):
        # numba's dispatcher reads this before its generic (slower) typeof machinery, on every kernel call
        if self._type is None:
            self._type = IsaType(self.name)
        return self._type

    def __getstate__(self):
        # without the numba type made on first use (its fields include a per-process serial number): numba's cache
        # keys a kernel that closes over a path on its pickled bytes (decode_step's layer worker)
        return {**self.__dict__, "_type": None}

    def __repr__(self) -> str:
        return f"Isa({self.name!r})"


AVX512VNNI = Isa("avx512vnni", ("avx512vnni", "avx512vl", "avx512bw", "avx2", "fma", "f16c"), vnni=True, wide=True)
AVXVNNI = Isa("avxvnni", ("avxvnni", "avx2", "fma", "f16c"), vnni=True, wide=False)
AVX2 = Isa("avx2", ("avx2", "fma", "f16c"), vnni=False, wide=False)
ISAS = {isa.name: isa for isa in (AVX512VNNI, AVXVNNI, AVX2)}


class IsaType(types.Dummy):
    """A path as the kernels are typed with it: its name and what it has (``Isa.vnni``, ``Isa.wide``)."""

    def __init__(self, name: str):
        self.isa_name = name
        self.vnni = ISAS[name].vnni
        self.wide = ISAS[name].wide
        super().__init__(name=f"isa[{name}]")


@typeof_impl.register(Isa)
def _typeof_isa(value, context):
    return IsaType(value.name)


register_model(IsaType)(models.OpaqueModel)


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


@lower_constant(IsaType)
def _lower_isa(context, builder, typ, value):
    # a path named as a constant in a kernel (decode_step's layer worker closes over it): its value is its type
    return context.get_dummy_value()


def host_features() -> set[str]:
    """The CPU features LLVM sees on this machine (``avx2``, ``avx512vnni``, ...): the ones numba compiles for."""
    import llvmlite.binding as llvm
    flags = llvm.get_host_cpu_features().flatten().split(",")
    return {flag[1:] for flag in flags if flag.startswith("+")}


def target_features() -> set[str]:
    """The CPU features numba compiles for: ``NUMBA_CPU_FEATURES`` where set (a cross-compile, as for Zen 3's
    code on another machine), else the host's."""
    from numba.core import config
    if not config.CPU_FEATURES:
        return host_features()
    return {flag[1:] for flag in config.CPU_FEATURES.split(",") if flag.startswith("+")}


def supported_isas() -> list[Isa]:
    """The SIMD paths this CPU can run, best first (empty on CPUs without AVX2, or not x86)."""
    features = host_features()
    return [isa for isa in (AVX512VNNI, AVXVNNI, AVX2) if all(need in features for need in isa.needs)]


def choose_isa() -> Isa | None:
    """The SIMD path the engine uses: ``GGML_BACKEND_KERNELS`` (``avx512vnni``, ``avxvnni``, ``avx2`` or ``generic``
    for the plain numba kernels) if set, else the best this CPU supports; None means the plain kernels."""
    forced = os.environ.get("GGML_BACKEND_KERNELS", "").strip().lower()
    available = supported_isas()
    if forced in ("", "auto"):
        return available[0] if available else None
    if forced == "generic":
        return None
    if forced not in ISAS:
        raise ValueError(f"GGML_BACKEND_KERNELS={forced!r}: expected auto, generic or one of {', '.join(ISAS)}")
    if ISAS[forced] not in available:
        raise ValueError(f"GGML_BACKEND_KERNELS={forced!r}: this CPU lacks "
                         f"{', '.join(n for n in ISAS[forced].needs if n not in host_features())}")
    return ISAS[forced]


# ----------------------------------------------------------------------------------------------------------------
# Vector types
# ----------------------------------------------------------------------------------------------------------------

class VectorType(types.Type):
    """An LLVM vector ``<count x element>`` held in a numba variable."""

    def __init__(self, element: str, count: int):
        self.element = element   # "i8", "i32" or "f32"
        self.count = count
        super().__init__(name=f"{element}x{count}")

    def llvm_type(self) -> ir.VectorType:
        element = {"i8": _I8, "i16": _I16, "i32": _I32, "f32": _F32}[self.element]
        return ir.VectorType(element, self.count)


@register_model(VectorType)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type())


I8x32 = VectorType("i8", 32)
I8x16 = VectorType("i8", 16)
I32x8 = VectorType("i32", 8)
F32x8 = VectorType("f32", 8)
# 512-bit vectors (AVX-512 paths only): the prompt GEMM (gemm.py) and the q2_K / q3_K decode kernels
I8x64 = VectorType("i8", 64)
I32x16 = VectorType("i32", 16)
F32x16 = VectorType("f32", 16)


def _half(builder, vector, first: int):
    """Lanes ``first`` .. ``first + 7`` of a 16-lane vector, as an 8-lane one (a constant shuffle)."""
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_I32, 8), list(range(first, first + 8))))


def _fold_halves(builder, vector):
    """Lanes 0-7 plus lanes 8-15 of a 16-lane integer vector, as an 8-lane one."""
    return builder.add(_half(builder, vector, 0), _half(builder, vector, 8))


def _zeros(vector: VectorType):
    """An intrinsic returning a ``vector`` of zeros."""
    def make(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vector.llvm_type(), None)
        return vector(), codegen
    zeros = intrinsic(make)
    zeros.__doc__ = f"An ``{vector}`` of zeros."
    return zeros


def _byte_pointer(context, builder, array_type, array, offset):
    """i8* to byte ``offset`` of a 1-D (or any C-contiguous) array's data."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(builder.bitcast(data, _I8.as_pointer()), [offset])


def _is_byte_array(typ) -> bool:
    # C-contiguous only: the loads address bytes as data pointer + offset
    return isinstance(typ, types.Array) and typ.dtype in (types.uint8, types.int8) and typ.layout == "C"


def _function(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


# ----------------------------------------------------------------------------------------------------------------
# Loads
# ----------------------------------------------------------------------------------------------------------------

def _vector_load(vector: VectorType):
    def make(typingctx, array, offset):
        if not _is_byte_array(array) or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
            return builder.load(builder.bitcast(pointer, vector.llvm_type().as_pointer()), align=1)
        return vector(array, offset), codegen
    return make


load_32_bytes = intrinsic(_vector_load(I8x32))
load_32_bytes.__doc__ = "``array[offset:offset + 32]`` (a byte array) as an ``I8x32``."
load_16_bytes = intrinsic(_vector_load(I8x16))
load_16_bytes.__doc__ = "``array[offset:offset + 16]`` (a byte array) as an ``I8x16``."


def _typed_load_codegen(vector: VectorType, broadcast: bool):
    """The code of ``_typed_load``: args (array, index, ...), the vector loaded or its first lane broadcast."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        pointer = builder.gep(data, [args[1]])
        if broadcast:
            return _splat_value(builder, builder.load(pointer, align=4), vector.count)
        return builder.load(builder.bitcast(pointer, vector.llvm_type().as_pointer()), align=4)
    return codegen


def _is_typed_array(array, dtype, index) -> bool:
    return (isinstance(array, types.Array) and array.dtype == dtype and array.layout == "C"
            and isinstance(index, types.Integer))


def _typed_load(vector: VectorType, dtype, broadcast: bool = False):
    """An intrinsic loading ``array[index:index + count]`` of a C-contiguous ``dtype`` array as ``vector``, or
    with ``broadcast`` ``array[index]`` in every lane (a broadcast load, which LLVM folds into the instruction that
    uses it)."""
    def make(typingctx, array, index):
        if not _is_typed_array(array, dtype, index):
            return None
        return vector(array, index), _typed_load_codegen(vector, broadcast)
    return intrinsic(make)


load_8_i32 = _typed_load(I32x8, types.int32)
load_8_i32.__doc__ = "``array[index:index + 8]`` of an int32 array as an ``I32x8``."


def _typed_store(vector: VectorType, dtype):
    """An intrinsic storing ``vector`` at ``array[index:index + count]`` of a C-contiguous ``dtype`` array
    (``_typed_load``'s counterpart)."""
    def make(typingctx, array, index, value):
        if not (_is_typed_array(array, dtype, index) and value == vector):
            return None

        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            pointer = builder.gep(data, [args[1]])
            builder.store(args[2], builder.bitcast(pointer, vector.llvm_type().as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(array, index, value), codegen
    return intrinsic(make)


store_8_i32 = _typed_store(I32x8, types.int32)
store_8_i32.__doc__ = "``array[index:index + 8] = vector`` for an int32 array."


def _stored_floats_load(storage: str):
    """An intrinsic loading 16 floats stored as ``storage`` (f16 or bf16) from byte ``offset`` of a byte array, as
    an ``F32x16`` (exact: ``vcvtph2ps``, or bf16's 16 bits moved to the top of a float; f32 is ``_vector_load``'s)."""
    def make(typingctx, array, offset):
        if not _is_byte_array(array) or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
            if storage == "f16":
                halves = builder.load(builder.bitcast(pointer, ir.VectorType(ir.HalfType(), 16).as_pointer()), align=1)
                return builder.fpext(halves, F32x16.llvm_type())
            words = builder.load(builder.bitcast(pointer, ir.VectorType(_I16, 16).as_pointer()), align=1)
            wide = builder.shl(builder.zext(words, I32x16.llvm_type()), _splat(_I32(16), 16))
            return builder.bitcast(wide, F32x16.llvm_type())
        return F32x16(array, offset), codegen
    return make


@intrinsic
def load_f16(typingctx, array, offset):
    """The IEEE half float at byte ``offset`` of a byte array, as float32 (``vcvtph2ps``: exact)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        half = builder.load(builder.bitcast(pointer, ir.HalfType().as_pointer()), align=1)
        return builder.fpext(half, _F32)
    return types.float32(array, offset), codegen


@intrinsic
def load_f16_pair(typingctx, array, offset):
    """The IEEE halves at bytes ``offset`` and ``offset + 2`` of a byte array as two float32 (exact): one 32-bit
    load into a vector register and one ``vcvtph2ps`` for both. ``load_f16`` becomes a ``vpinsrw`` from memory,
    which takes three slots of Zen 3 / Zen 4's load / store-data pipes (a plain load takes one): q4_1 / q5_1's d and
    m were the busiest part of their one-token loops there (``llvm-mca``). A kind with one scale takes the half it
    needs; all four bytes must lie in the block (they are read). Targets with AVX512-FP16 load each half alone."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer):
        return None

    scalar_halves = "avx512fp16" in target_features()

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        if scalar_halves:
            # AVX512-FP16 loads a half by itself (vmovsh, a plain load) and converts it as a scalar: on Sapphire
            # Rapids the pair's extra shuffle made q5_1's loop 7% longer (llvm-mca), so each half alone there
            halves = [builder.fpext(builder.load(builder.bitcast(
                builder.gep(pointer, [_I32(2 * lane)]), ir.HalfType().as_pointer()), align=1), _F32)
                for lane in (0, 1)]
            return context.make_tuple(builder, sig.return_type, halves)
        pair_type = ir.VectorType(ir.HalfType(), 2)
        loaded = builder.load(builder.bitcast(pointer, pair_type.as_pointer()), align=1)
        # ``freeze`` (a no-op on a loaded value; llvmlite has no builder method for it): without it LLVM narrows
        # the load to the one half a kind uses (q5_0's d; q3_K / q6_K's), a vpinsrw from memory again
        frozen = ir.Instruction(builder.block, pair_type, "freeze", [loaded])
        builder._insert(frozen)
        pair = builder.fpext(frozen, ir.VectorType(_F32, 2))
        return context.make_tuple(builder, sig.return_type,
                                  [builder.extract_element(pair, ir.Constant(_I32, lane)) for lane in (0, 1)])
    return types.UniTuple(types.float32, 2)(array, offset), codegen


@intrinsic
def load_f16_pair_times(typingctx, array, offset, scale):
    """The two IEEE halves at bytes ``offset`` and ``offset + 2`` of a byte array times the float32 ``scale``, each
    in all lanes of an ``F32x8`` (q2_K's d and dmin times a token's scale): one 32-bit load, one ``vcvtph2ps``
    and one multiply for both, the products those of two scalar ``load_f16(...) * scale``."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer) or not isinstance(scale, types.Float):
        return None

    def codegen(context, builder, sig, args):
        pair_type = ir.VectorType(ir.HalfType(), 2)
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        pair = builder.fpext(builder.load(builder.bitcast(pointer, pair_type.as_pointer()), align=1),
                             ir.VectorType(_F32, 2))
        scale_value = args[2] if args[2].type == _F32 else builder.fptrunc(args[2], _F32)
        products = builder.fmul(pair, _splat_value(builder, scale_value, 2))
        splats = [builder.shuffle_vector(products, products, ir.Constant(ir.VectorType(_I32, 8), [lane] * 8))
                  for lane in (0, 1)]
        return context.make_tuple(builder, sig.return_type, splats)
    return types.UniTuple(F32x8, 2)(array, offset, scale), codegen


@intrinsic
def half_to_float(typingctx, bits):
    """The IEEE half float whose bit pattern is ``bits`` (a 16-bit integer) as float32: exact, and a plain
    conversion that LLVM vectorizes (``vcvtph2ps`` with F16C) where a table lookup would be a gather."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
    return types.float32(bits), codegen


@intrinsic
def round_to_half(typingctx, value):
    """A float32 rounded to the nearest half float (ties to even; beyond the largest half: inf), as float32: a
    conversion there and back that LLVM vectorizes (``vcvtps2ph`` / ``vcvtph2ps`` with F16C)."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), _F32)
    return types.float32(value), codegen


@intrinsic
def half_bits(typingctx, value):
    """A float32 rounded to the nearest half float (ties to even; beyond the largest half: inf) as its uint16 bit
    pattern (``vcvtps2ph``): the bits numpy's ``astype(np.float16)`` stores, as ``floats.float_to_half_bits``."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)
    return types.uint16(value), codegen


@intrinsic
def load_u32(typingctx, array, offset):
    """The little-endian uint32 at byte ``offset`` of a byte array (as int64, for plain numba arithmetic)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        value = builder.load(builder.bitcast(pointer, _I32.as_pointer()), align=1)
        return builder.zext(value, ir.IntType(64))
    return types.int64(array, offset), codegen


@intrinsic
def load_u64(typingctx, array, offset):
    """The little-endian 64-bit word at byte ``offset`` of a byte array (as int64: its bits, for bitwise
    arithmetic)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(pointer, ir.IntType(64).as_pointer()), align=1)
    return types.int64(array, offset), codegen


def _prefetch(locality: int):
    """An intrinsic hinting that byte ``offset`` of a byte array will be read soon, into the cache levels LLVM's
    ``locality`` names (3: ``prefetcht0``, all of them; 2: ``prefetcht1``, L2 and beyond; 0: ``prefetchnta``, close
    to the core with as little of the other levels as the CPU allows). Never faults."""
    def make(typingctx, array, offset):
        if not _is_byte_array(array) or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
            function = _function(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
            builder.call(function, [pointer, _I32(0), _I32(locality), _I32(1)])
            return context.get_dummy_value()
        return types.void(array, offset), codegen
    return intrinsic(make)


prefetch = _prefetch(3)
prefetch.__doc__ = "A hint that byte ``offset`` of ``array`` will be read soon (``prefetcht0``). Never faults."
prefetch_to_l2 = _prefetch(2)
prefetch_to_l2.__doc__ = ("``prefetch`` into L2 (``prefetcht1``): for data a whole panel ahead, which in L1 would "
                          "push out the lines being read. Never faults.")
prefetch_nta = _prefetch(0)
prefetch_nta.__doc__ = ("A hint that byte ``offset`` of ``array`` will be read soon, once (``prefetchnta``). Never "
                        "faults.")


# ----------------------------------------------------------------------------------------------------------------
# Byte shuffling: turning packed quants into one byte per weight
# ----------------------------------------------------------------------------------------------------------------

def _splat(value: ir.Constant, count: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(value.type, count), [value] * count)


def _as_i32(builder, scalar):
    """An LLVM integer of any width as i32 (truncated, or sign-extended)."""
    if scalar.type.width > 32:
        return builder.trunc(scalar, _I32)
    if scalar.type.width < 32:
        return builder.sext(scalar, _I32)
    return scalar


def _splat_value(builder, scalar, count):
    """A vector of ``count`` copies of a run-time scalar (insertelement + shufflevector: one broadcast)."""
    vector_type = ir.VectorType(scalar.type, count)
    single = builder.insert_element(ir.Constant(vector_type, None), scalar, _I32(0))
    return builder.shuffle_vector(single, ir.Constant(vector_type, None),
                                  ir.Constant(ir.VectorType(_I32, count), [0] * count))


@intrinsic
def unpack_nibbles(typingctx, packed):
    """16 bytes -> 32 bytes: the low nibbles (values 0..15 of a q4_0/q4_1 block), then the high nibbles."""
    if packed != I8x16:
        return None

    def codegen(context, builder, sig, args):
        # the 16 bytes in both halves, the upper half's 64-bit words shifted right by 4 (vpsrlvq), then & 15: a
        # broadcast that folds into the load (vbroadcasti128) and two ALU operations, where shift, insert, and
        # took three, one of them on the shuffle ports
        both = builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
        words = builder.bitcast(both, ir.VectorType(ir.IntType(64), 4))
        shifted = builder.lshr(words, ir.Constant(ir.VectorType(ir.IntType(64), 4), [0, 0, 4, 4]))
        return builder.and_(builder.bitcast(shifted, ir.VectorType(_I8, 32)), _splat(_I8(15), 32))
    return I8x32(packed), codegen


@intrinsic
def low_nibbles(typingctx, packed):
    """``packed & 15`` in every byte."""
    if packed != I8x32:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], _splat(_I8(15), 32))
    return I8x32(packed), codegen


def _word_shift(builder, vector, count, operation):
    """Shift the words of a 32- or 64-byte vector by one run-time count (``vpsrlw`` / ``vpsllw`` with the count in
    a register): x86 has no byte shifts, and LLVM scalarizes a byte shift by a count it cannot see as a constant."""
    n_bytes = vector.type.count
    words = builder.bitcast(vector, ir.VectorType(_I16, n_bytes // 2))
    amount = _splat_value(builder, builder.zext(builder.trunc(count, _I8), _I16), n_bytes // 2)
    return builder.bitcast(getattr(builder, operation)(words, amount), vector.type)


@intrinsic
def shift_right_and(typingctx, packed, shift, mask):
    """``(packed >> shift) & mask`` in every byte of an ``I8x32`` or ``I8x64``, for ``mask < 2 ** (8 - shift)``
    (the bits a word shift brings in from the neighbouring byte are then masked off)."""
    if packed not in (I8x32, I8x64) or not isinstance(shift, types.Integer) or not isinstance(mask, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        shifted = _word_shift(builder, args[0], args[1], "lshr")
        return builder.and_(shifted, _splat_value(builder, builder.trunc(args[2], _I8), packed.count))
    return packed(packed, shift, mask), codegen


@intrinsic
def shift_left(typingctx, packed, shift):
    """``packed << shift`` in every byte (``I8x32`` or ``I8x64``), for bytes below ``2 ** (8 - shift)`` (none
    carries into its neighbour)."""
    if packed not in (I8x32, I8x64) or not isinstance(shift, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _word_shift(builder, args[0], args[1], "shl")
    return packed(packed, shift), codegen


@intrinsic
def bits_to_bytes(typingctx, bits, value):
    """32 bytes from the 32 bits of ``bits`` (an integer): byte j = ``value`` where bit j is set, else 0.

    A ``bitcast i32 -> <32 x i1>`` and a ``select``: one masked move on AVX-512BW, a broadcast, and and compare
    on AVX2 (LLVM lowers both). Used for the fifth bits of q5_0 / q5_1."""
    if not isinstance(bits, types.Integer) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        mask = builder.bitcast(builder.trunc(args[0], _I32), ir.VectorType(ir.IntType(1), 32))
        return builder.select(mask, _splat_value(builder, builder.trunc(args[1], _I8), 32),
                              ir.Constant(ir.VectorType(_I8, 32), None))
    return I8x32(bits, value), codegen


def _lanewise(vector: VectorType | tuple, operation: str):
    """An intrinsic for ``a <operation> b`` lane by lane on two vectors of type ``vector`` (or of one type of a
    tuple of them)."""
    vectors = vector if isinstance(vector, tuple) else (vector,)

    def make(typingctx, a, b):
        if a not in vectors or b != a:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, operation)(args[0], args[1])
        return a(a, b), codegen
    return intrinsic(make)


or_bytes = _lanewise((I8x32, I8x64), "or_")
or_bytes.__doc__ = "Bytewise ``a | b`` (``I8x32`` or ``I8x64``)."
add_bytes = _lanewise(I8x32, "add")
add_bytes.__doc__ = "Bytewise ``a + b`` (wrapping)."
add_i32x8 = _lanewise(I32x8, "add")
add_i32x8.__doc__ = "Lanewise ``a + b`` of two ``I32x8``."
add_f32x8 = _lanewise(F32x8, "fadd")
add_f32x8.__doc__ = "Lanewise ``a + b`` of two ``F32x8``."


@intrinsic
def times_byte_halves(typingctx, q, a, b):
    """Bytewise ``q * a`` for bytes 0-15 of an ``I8x32`` and ``q * b`` for bytes 16-31 (wrapping; the caller
    keeps the products within a byte): a 32-value group whose 16-value halves have integer scales ``a`` and ``b``
    (LLVM widens to 16 bits for ``vpmullw`` and narrows back)."""
    if q != I8x32 or not isinstance(a, types.Integer) or not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        first = _splat_value(builder, builder.trunc(args[1], _I8), 16)
        second = _splat_value(builder, builder.trunc(args[2], _I8), 16)
        scales = builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        return builder.mul(args[0], scales)
    return I8x32(q, a, b), codegen


# ----------------------------------------------------------------------------------------------------------------
# Integer dot products
# ----------------------------------------------------------------------------------------------------------------

def _avx2_quad_sums(builder, unsigned, signed):
    """Sums of four unsigned x signed byte products per int32 lane: ``vpmaddubsw`` (pairs into int16, saturating
    past 32767) then ``vpmaddwd`` with ones."""
    bytes_type = ir.VectorType(_I8, 32)
    pairs_type = ir.VectorType(_I16, 16)
    maddubs = _function(builder, "llvm.x86.avx2.pmadd.ub.sw", pairs_type, [bytes_type, bytes_type])
    maddwd = _function(builder, "llvm.x86.avx2.pmadd.wd", I32x8.llvm_type(), [pairs_type, pairs_type])
    return builder.call(maddwd, [builder.call(maddubs, [unsigned, signed]), _splat(_I16(1), 16)])


def _avx2_signed_quad_sums(builder, weights, values):
    """Sums of four signed x signed byte products per int32 lane on AVX2: ``_avx2_quad_sums`` of the weights'
    absolute values and the values with the weights' signs (``vpsignb``, ggml's ``mul_sum_i8_pairs``); exact for
    values within -127..127 (a pair at most 2 x 128 x 127)."""
    bytes_type = ir.VectorType(_I8, 32)
    absolute = builder.call(_function(builder, "llvm.abs.v32i8", bytes_type, [bytes_type, ir.IntType(1)]),
                            [weights, ir.IntType(1)(0)])
    signs = builder.call(_function(builder, "llvm.x86.avx2.psign.b", bytes_type, [bytes_type, bytes_type]),
                         [values, weights])
    return _avx2_quad_sums(builder, absolute, signs)


def _vpdpbusd(builder, acc, unsigned, signed):
    """``acc`` plus the sums of four unsigned x signed byte products per int32 lane: ``vpdpbusd`` on 32 bytes
    (AVX512-VNNI with VL, or AVX-VNNI) or 64 (AVX512-VNNI)."""
    n_bytes = unsigned.type.count
    bytes_type, lanes = ir.VectorType(_I8, n_bytes), ir.VectorType(_I32, n_bytes // 4)
    function = _function(builder, f"llvm.x86.avx512.vpdpbusd.{n_bytes * 8}", lanes, [lanes, bytes_type, bytes_type])
    return builder.call(function, [acc, unsigned, signed])


@intrinsic
def dot_u8_i8(typingctx, acc, unsigned, signed, isa):
    """``acc + sum of unsigned[4i + j] * signed[4i + j] over j`` in each int32 lane i (llama.cpp's
    ``mul_sum_us8_pairs``): ``vpdpbusd`` on AVX512-VNNI; on AVX2 ``vpmaddubsw`` (pairs summed into int16, which
    saturates only past 32767: weights up to 127 times activations up to 127 cannot reach it) then ``vpmaddwd``
    with ones."""
    if acc != I32x8 or unsigned != I8x32 or signed != I8x32 or not isinstance(isa, IsaType):
        return None
    vnni = isa.vnni

    def codegen(context, builder, sig, args):
        acc_value, u_value, s_value = args[0], args[1], args[2]
        if vnni:
            return _vpdpbusd(builder, acc_value, u_value, s_value)
        return builder.add(acc_value, _avx2_quad_sums(builder, u_value, s_value))
    return I32x8(acc, unsigned, signed, isa), codegen


zero_i32x8 = _zeros(I32x8)


@intrinsic
def mul_i32x8(typingctx, a, b):
    """Lanewise ``a * b`` of two ``I32x8`` (``vpmulld``), or of an ``I32x8`` and a scalar integer broadcast."""
    if a != I32x8 or not (b == I32x8 or isinstance(b, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        if sig.args[1] == I32x8:
            return builder.mul(args[0], args[1])
        scalar = context.cast(builder, args[1], sig.args[1], types.int32)
        return builder.mul(args[0], _splat_value(builder, scalar, 8))
    return I32x8(a, b), codegen


def _pair_of_bytes(signed: bool, mask: int):
    def make(typingctx, array, offset):
        if not _is_byte_array(array) or not isinstance(offset, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
            pair = builder.load(builder.bitcast(pointer, ir.VectorType(_I8, 2).as_pointer()), align=1)
            if mask != 0xFF:
                pair = builder.and_(pair, _splat(_I8(mask), 2))
            wide = (builder.sext if signed else builder.zext)(pair, ir.VectorType(_I32, 2))
            return builder.shuffle_vector(wide, ir.Constant(ir.VectorType(_I32, 2), None),
                                          ir.Constant(ir.VectorType(_I32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))
        return I32x8(array, offset), codegen
    return make


pair_scales_i32x8 = intrinsic(_pair_of_bytes(signed=True, mask=0xFF))
pair_scales_i32x8.__doc__ = """Lanes 0-3 = the int8 at ``array[offset]``, lanes 4-7 = the int8 at ``array[offset + 1]``
(sign-extended): the two 16-value scales of a 32-value K-quant group, matching the lanes of ``dot_u8_i8``."""


# ----------------------------------------------------------------------------------------------------------------
# Float accumulation
# ----------------------------------------------------------------------------------------------------------------

zero_f32x8 = _zeros(F32x8)


@intrinsic
def fma_i32x8(typingctx, acc, dot, scale):
    """``acc + float(dot) * scale`` lanewise (``vcvtdq2ps`` + ``vfmadd``): one block's integer dot product,
    scaled, added to a row's float accumulator. ``scale``: a float, or an ``F32x8`` (lanewise)."""
    return _fma_i32x8(acc, dot, scale, negate=False)


@intrinsic
def fnma_i32x8(typingctx, acc, dot, scale):
    """``acc - float(dot) * scale`` lanewise, rounded once (``vfnmadd``): ``fma_i32x8`` with ``-scale``, bit for
    bit."""
    return _fma_i32x8(acc, dot, scale, negate=True)


def _fma_i32x8(acc, dot, scale, negate: bool):
    if acc != F32x8 or dot != I32x8 or not (isinstance(scale, types.Float) or scale == F32x8):
        return None

    def codegen(context, builder, sig, args):
        floats = builder.sitofp(args[1], F32x8.llvm_type())
        if sig.args[2] == F32x8:
            scales = args[2]
        else:
            scalar = args[2] if args[2].type == _F32 else builder.fptrunc(args[2], _F32)
            scales = _splat_value(builder, scalar, 8)
        if negate:
            floats = builder.fsub(ir.Constant(F32x8.llvm_type(), [-0.0] * 8), floats)   # fneg: exact
        function = _function(builder, "llvm.fma.v8f32", F32x8.llvm_type(), [F32x8.llvm_type()] * 3)
        return builder.call(function, [floats, scales, args[0]])
    return F32x8(acc, dot, scale), codegen


def _lane_sum(vector: VectorType):
    """An intrinsic for the sum of a float vector's lanes in a fixed order: the low half plus the high half, then
    the same on the result, down to one lane (so an 8-lane sum of (a + b) is the 16-lane sum of a | b)."""
    def make(typingctx, a):
        if a != vector:
            return None

        def codegen(context, builder, sig, args):
            value = args[0]
            width = vector.count
            while width > 1:
                width //= 2
                mask_type = ir.VectorType(_I32, width)
                low = builder.shuffle_vector(value, value, ir.Constant(mask_type, list(range(width))))
                high = builder.shuffle_vector(value, value, ir.Constant(mask_type, list(range(width, 2 * width))))
                value = builder.fadd(low, high)
            return builder.extract_element(value, _I32(0))
        return types.float32(a), codegen
    return intrinsic(make)


sum_f32x8 = _lane_sum(F32x8)
sum_f32x8.__doc__ = "The sum of the eight lanes in a fixed order (halves, then quarters, then pairs), as float32."


@intrinsic
def splat_bytes(typingctx, value):
    """An ``I8x32`` with every byte ``value``."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat_value(builder, builder.trunc(args[0], _I8), 32)
    return I8x32(value), codegen


@intrinsic
def signed_dot_offset(typingctx, isa):
    """The offset ``dot_i8_i8`` needs folded into its accumulator (``lane_bias(x, offset)``): 128 on VNNI, which
    multiplies unsigned by signed bytes and so sees signed weights as w + 128; 0 on AVX2, which takes signs apart."""
    if not isinstance(isa, IsaType):
        return None
    offset = 128 if isa.vnni else 0

    def codegen(context, builder, sig, args):
        return ir.IntType(64)(offset)
    return types.int64(isa), codegen


@intrinsic
def dot_i8_i8(typingctx, bias, signed_weights, signed, isa):
    """Exact dot products of signed weight bytes with signed activation bytes in the eight int32 lanes of
    ``dot_u8_i8``, plus ``bias``, which must be ``lane_bias(x, signed_dot_offset(isa))``. VNNI: ``vpdpbusd`` on
    w + 128 (``bias`` removes 128 * x); AVX2: ``vpmaddubsw`` on |w| and x with w's signs (``vpsignb``, ggml's
    ``mul_sum_i8_pairs``), which cannot saturate (128 * 127 * 2 < 32768)."""
    if bias != I32x8 or signed_weights != I8x32 or signed != I8x32 or not isinstance(isa, IsaType):
        return None
    vnni = isa.vnni

    def codegen(context, builder, sig, args):
        if vnni:
            return _vpdpbusd(builder, args[0], builder.xor(args[1], _splat(_I8(0x80), 32)), args[2])
        return builder.add(args[0], _avx2_signed_quad_sums(builder, args[1], args[2]))
    return I32x8(bias, signed_weights, signed, isa), codegen


@intrinsic
def load_16_bytes_twice(typingctx, array, offset):
    """``array[offset:offset + 16]`` (a byte array) in both 128-bit halves of an ``I8x32`` (``vbroadcasti128``):
    q2_K's sixteen scale bytes, from which each group's scale words and the minimums' words come by one in-half
    ``vpshufb`` each (``byte_scale_words``, ``high_nibbles_times_pairs``)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        packed = builder.load(builder.bitcast(pointer, ir.VectorType(_I8, 16).as_pointer()), align=1)
        return builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
    return I8x32(array, offset), codegen


def _bytes_to_words(builder, twice, low_half, high_half):
    """``vpshufb`` of ``twice`` (the same 16 bytes in both halves) into 16 zero-extended words: bytes
    ``low_half[i]`` for words 0-7, ``high_half[i]`` for words 8-15 (run-time i32 vectors of 8)."""
    bytes_type = ir.VectorType(_I8, 32)
    mask = ir.Constant(bytes_type, None)
    for i in range(8):
        for half, picks in ((0, low_half), (1, high_half)):
            at = 16 * half + 2 * i
            mask = builder.insert_element(mask, builder.trunc(builder.extract_element(picks, _I32(i)), _I8), _I32(at))
            mask = builder.insert_element(mask, _I8(-128), _I32(at + 1))     # 0x80: a zero high byte
    function = _function(builder, "llvm.x86.avx2.pshuf.b", bytes_type, [bytes_type, bytes_type])
    return builder.call(function, [twice, mask])


@intrinsic
def byte_scale_words(typingctx, twice, index):
    """The scale words of ``scaled_dot`` for a group whose two 16-value scales are bytes ``index`` and ``index + 1``
    of ``twice`` (``load_16_bytes_twice``, scales within 0..255): byte ``index`` zero-extended in the words of lanes
    0-3, byte ``index + 1`` in lanes 4-7. One ``vpshufb`` (a constant mask once LLVM has unrolled the group loop)."""
    if twice != I8x32 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        at = context.cast(builder, args[1], sig.args[1], types.int32)
        low = _splat_value(builder, at, 8)
        high = builder.add(low, _splat(_I32(1), 8))
        return builder.bitcast(_bytes_to_words(builder, args[0], low, high), I32x8.llvm_type())
    return I32x8(twice, index), codegen


@intrinsic
def high_nibbles_times_pairs(typingctx, twice, pairs, index):
    """The sixteen products ``(byte j of twice >> 4) * sum j`` (``twice``: ``load_16_bytes_twice``), lanes j and
    j + 8 added: an ``I32x8``, q2_K's minimums times the activation sums per 16, in eight lanes that a float
    accumulator takes with one fused multiply-add. The sums are int16 in pairs (``pairs[index + 2j]`` = sum j,
    ``[index + 2j + 1]`` = sum j + 8, as ``decode.paired_bsums`` lays them out), so one ``vpmaddwd`` of the nibbles,
    put into words in that order by one ``vpshufb``, gives the eight lanes (int32 sums widened into two registers
    and multiplied by two ``vpmulld`` before)."""
    if not (twice == I8x32 and isinstance(pairs, types.Array) and pairs.dtype == types.int16
            and pairs.layout == "C" and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        nibbles = builder.and_(_word_shift(builder, args[0], _I32(4), "lshr"), _splat(_I8(15), 32))
        first = ir.Constant(ir.VectorType(_I32, 8), [0, 8, 1, 9, 2, 10, 3, 11])
        words = _bytes_to_words(builder, nibbles, first, builder.add(first, _splat(_I32(4), 8)))
        words_type = ir.VectorType(_I16, 16)
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        sums = builder.load(builder.bitcast(builder.gep(data, [args[2]]), words_type.as_pointer()), align=2)
        maddwd = _function(builder, "llvm.x86.avx2.pmadd.wd", I32x8.llvm_type(), [words_type, words_type])
        return builder.call(maddwd, [builder.bitcast(words, words_type), sums])
    return I32x8(twice, pairs, index), codegen


@intrinsic
def store_scaled(typingctx, array, index, quants, scale_a, scale_b, offset_a, offset_b):
    """``array[index + i] = float(quants[i]) * scale - offset`` for the 32 signed bytes ``quants``, with
    ``scale_a`` / ``offset_a`` for i < 16 and ``scale_b`` / ``offset_b`` for the rest: a multiply then a subtract,
    each rounded (no fused multiply-add), so that the floats equal the type table's dequantizers bit for bit."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.layout == "C"
            and quants == I8x32
            and all(isinstance(t, types.Float) for t in (scale_a, scale_b, offset_a, offset_b))):
        return None

    def codegen(context, builder, sig, args):
        scale_a_, scale_b_, offset_a_, offset_b_ = (context.cast(builder, args[i], sig.args[i], types.float32)
                                                    for i in (3, 4, 5, 6))
        vector_type = ir.VectorType(_F32, 32)
        mask = ir.Constant(ir.VectorType(_I32, 32), [0] * 16 + [1] * 16)

        def per_half(a, b):
            pair = builder.insert_element(builder.insert_element(ir.Constant(ir.VectorType(_F32, 2), None), a,
                                                                 _I32(0)), b, _I32(1))
            return builder.shuffle_vector(pair, ir.Constant(ir.VectorType(_F32, 2), None), mask)
        floats = builder.sitofp(args[2], vector_type)
        values = builder.fsub(builder.fmul(floats, per_half(scale_a_, scale_b_)), per_half(offset_a_, offset_b_))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store(values, builder.bitcast(builder.gep(data, [args[1]]), vector_type.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(array, index, quants, scale_a, scale_b, offset_a, offset_b), codegen


@intrinsic
def float_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``bits`` (a bitcast; vectorizes)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(context.cast(builder, args[0], sig.args[0], types.int32), _F32)
    return types.float32(bits), codegen


@intrinsic
def exponent_plus(typingctx, value, addend):
    """The float32 whose bits are ``value``'s bits shifted left by 23, plus ``addend``, in 32-bit wrapping
    arithmetic: ``value`` = 1.5 * 2^23 + n puts the integer n in the exponent field (2^n for addend 1.0's bits),
    as ggml's vectorized exp does with ``_mm256_slli_epi32`` / ``_mm256_add_epi32``. In 32 bits so that LLVM
    vectorizes it eight lanes to a register (numba's own integers are 64-bit)."""
    if value != types.float32 or not isinstance(addend, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        field = builder.shl(builder.bitcast(args[0], _I32), ir.Constant(_I32, 23))
        addend32 = builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64), _I32)
        return builder.bitcast(builder.add(field, addend32), _F32)
    return types.float32(value, addend), codegen


@intrinsic
def fma_f32(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma.f32``: ``vfmadd`` with FMA, which LLVM vectorizes in loops; a
    correctly rounded library call without), as C's ``fmaf`` and the ``_mm256_fmadd_ps`` of ggml's kernels."""
    if a != types.float32 or b != types.float32 or c != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_function(builder, "llvm.fma.f32", _F32, [_F32] * 3), list(args))
    return types.float32(a, b, c), codegen

# ----------------------------------------------------------------------------------------------------------------
# 512-bit vectors: the prompt GEMM (gemm.py). One ``I8x64`` holds two 32-value groups; ``dot_u8_i8_x64`` sums four
# byte products per int32 lane as ``dot_u8_i8`` does, so lanes 0-7 belong to the first group and 8-15 to the
# second, and a per-lane float scale vector scales each group (or 16-value half) by its own numbers.
# ----------------------------------------------------------------------------------------------------------------

load_64_bytes = intrinsic(_vector_load(I8x64))
load_64_bytes.__doc__ = "``array[offset:offset + 64]`` (a byte array) as an ``I8x64``."


load_16_i32 = _typed_load(I32x16, types.int32)
load_16_i32.__doc__ = "``array[index:index + 16]`` of an int32 array as an ``I32x16``."
load_16_f32 = _typed_load(F32x16, types.float32)
load_16_f32.__doc__ = "``array[index:index + 16]`` of a float32 array as an ``F32x16``."


store_16_f32 = _typed_store(F32x16, types.float32)
store_16_f32.__doc__ = "``array[index:index + 16] = vector`` for a float32 array."


@intrinsic
def load_16_f16(typingctx, array, index):
    """``array[index:index + 16]`` of a uint16 array holding IEEE half floats, as an ``F32x16`` (exact:
    ``vcvtph2ps``)."""
    if not (isinstance(array, types.Array) and array.dtype == types.uint16 and array.layout == "C"
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.VectorType(ir.HalfType(), 16).as_pointer())
        return builder.fpext(builder.load(pointer, align=2), F32x16.llvm_type())
    return F32x16(array, index), codegen


@intrinsic
def fma_f32x16(typingctx, acc, a, b):
    """``acc + a * b`` lanewise, rounded once (one ``vfmadd``)."""
    if acc != F32x16 or a != F32x16 or b != F32x16:
        return None

    def codegen(context, builder, sig, args):
        function = _function(builder, "llvm.fma.v16f32", F32x16.llvm_type(), [F32x16.llvm_type()] * 3)
        return builder.call(function, [args[1], args[2], args[0]])
    return F32x16(acc, a, b), codegen


@intrinsic
def dot_u8_i8_x64(typingctx, acc, unsigned, signed, isa):
    """``dot_u8_i8`` on 64 bytes: ``vpdpbusd`` on a 512-bit register (AVX512-VNNI only: no other path compiles)."""
    if acc != I32x16 or unsigned != I8x64 or signed != I8x64 or not isinstance(isa, IsaType):
        return None
    if not isa.wide:
        return None

    def codegen(context, builder, sig, args):
        return _vpdpbusd(builder, args[0], args[1], args[2])
    return I32x16(acc, unsigned, signed, isa), codegen


zero_f32x16 = _zeros(F32x16)

load_32_bf16_pairs_at = intrinsic(_vector_load(I32x16))
load_32_bf16_pairs_at.__doc__ = ("Thirty-two bfloat16 from byte ``offset`` of a byte array as sixteen pairs, an "
                                 "``I32x16`` (value 2i in lane i's low half, 2i + 1 in its high half).")


class _BFloat16(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it): the element type ``vdpbf16ps``'s intrinsic takes."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat16)

    def __hash__(self):
        return hash("bfloat")


def has_native_bf16_dot() -> bool:
    """Whether the kernels compile ``vdpbf16ps`` (AVX512-BF16: Intel Cooper Lake, Sapphire Rapids and later, AMD Zen
    4 and later), else its emulation by two fused multiply-adds (``dot_bf16_pairs``)."""
    return "avx512bf16" in target_features()


@intrinsic
def dot_bf16_pairs(typingctx, acc, a, b):
    """``acc + a[2i + 1] * b[2i + 1]`` then ``+ a[2i] * b[2i]`` in each float lane i (a, b: ``I32x16`` of bfloat16
    pairs), each step rounded once: ``vdpbf16ps`` where the CPU has AVX512-BF16, else the same two steps as fused
    multiply-adds of the pairs' halves widened to float32 (a bfloat16 product is exact in float32, so the two agree
    bit for bit, except that ``vdpbf16ps`` flushes denormal inputs and results to zero)."""
    if acc != F32x16 or a != I32x16 or b != I32x16:
        return None
    native = has_native_bf16_dot()

    def codegen(context, builder, sig, args):
        floats = F32x16.llvm_type()
        if native:
            pairs = ir.VectorType(_BFloat16(), 32)
            function = _function(builder, "llvm.x86.avx512bf16.dpbf16ps.512", floats, [floats, pairs, pairs])
            return builder.call(function, [args[0], builder.bitcast(args[1], pairs), builder.bitcast(args[2], pairs)])
        fma = _function(builder, "llvm.fma.v16f32", floats, [floats] * 3)
        high = _splat(_I32(-65536), 16)          # 0xFFFF0000: the odd value, already in a float's top half
        sixteen = _splat(_I32(16), 16)
        odd_a, odd_b = (builder.bitcast(builder.and_(v, high), floats) for v in args[1:])
        even_a, even_b = (builder.bitcast(builder.shl(v, sixteen), floats) for v in args[1:])
        return builder.call(fma, [even_a, even_b, builder.call(fma, [odd_a, odd_b, args[0]])])
    return F32x16(acc, a, b), codegen


load_16_f32_at = intrinsic(_vector_load(F32x16))
load_16_f32_at.__doc__ = "Sixteen float32 from byte ``offset`` of a byte array, as an ``F32x16``."
load_16_f16_at = intrinsic(_stored_floats_load("f16"))
load_16_f16_at.__doc__ = "Sixteen IEEE half floats from byte ``offset`` of a byte array, as an ``F32x16`` (exact)."
load_16_bf16_at = intrinsic(_stored_floats_load("bf16"))
load_16_bf16_at.__doc__ = "Sixteen bfloat16 from byte ``offset`` of a byte array, as an ``F32x16`` (exact)."


@intrinsic
def times_f32x16(typingctx, vector, factor):
    """``vector * factor`` lanewise for a float32 scalar ``factor`` (one ``vmulps``, each lane rounded as a scalar
    product is)."""
    if vector != F32x16 or factor != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _splat_value(builder, args[1], 16))
    return F32x16(vector, factor), codegen


@intrinsic
def fma_i32x16(typingctx, acc, dot, scale_a, scale_b):
    """``acc + float(dot) * (scale_a * scale_b)`` lanewise (``vcvtdq2ps``, ``vmulps``, ``vfmadd``): two groups'
    integer dot products scaled by the weights' and the activations' lane scales."""
    if acc != F32x16 or dot != I32x16 or scale_a != F32x16 or scale_b != F32x16:
        return None

    def codegen(context, builder, sig, args):
        floats = builder.sitofp(args[1], F32x16.llvm_type())
        function = _function(builder, "llvm.fma.v16f32", F32x16.llvm_type(), [F32x16.llvm_type()] * 3)
        return builder.call(function, [floats, builder.fmul(args[2], args[3]), args[0]])
    return F32x16(acc, dot, scale_a, scale_b), codegen


@intrinsic
def fma_i32x16_folded(typingctx, acc, dot, scale_a, scale_b):
    """``fma_i32x16`` for one 8-lane chain: lanes 0-7 of acc plus the low group's scaled lanes, then plus the high
    group's (two fused adds, in that order), zeros in lanes 8-15: the one-token kernel's arithmetic for a kind
    that accumulates its blocks in one chain (q8_0)."""
    if acc != F32x16 or dot != I32x16 or scale_a != F32x16 or scale_b != F32x16:
        return None

    def codegen(context, builder, sig, args):
        half = ir.VectorType(_F32, 8)
        low_lanes = ir.Constant(ir.VectorType(_I32, 8), list(range(8)))
        high_lanes = ir.Constant(ir.VectorType(_I32, 8), list(range(8, 16)))
        floats = builder.sitofp(args[1], F32x16.llvm_type())
        scales = builder.fmul(args[2], args[3])
        function = _function(builder, "llvm.fma.v8f32", half, [half] * 3)
        chain = builder.shuffle_vector(args[0], args[0], low_lanes)
        for lanes in (low_lanes, high_lanes):
            chain = builder.call(function, [builder.shuffle_vector(floats, floats, lanes),
                                            builder.shuffle_vector(scales, scales, lanes), chain])
        zeros = ir.Constant(half, None)
        return builder.shuffle_vector(chain, zeros, ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
    return F32x16(acc, dot, scale_a, scale_b), codegen


sum_f32x16 = _lane_sum(F32x16)
sum_f32x16.__doc__ = """The sum of the sixteen lanes in a fixed order (halves first: the sum of ``sum_f32x8``'s two
chains when they are the halves), as float32."""


@intrinsic
def lane_sums_f32x16(typingctx, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """Sixteen ``F32x16`` summed at once: lane m of the result is ``sum_f32x16(vectors[m])``, bit for bit (each
    vector's lanes added in the same pairs and order: lane i and i + 8, then i and i + 4, i + 2, i + 1). Two
    vectors' halves meet in one register at each level (two shuffles and one addition serve two sums), 15 levels'
    worth of additions for the sixteen instead of 64 (the reductions closed every 4 x 4 prompt tile)."""
    vectors = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15)
    if any(v != F32x16 for v in vectors):
        return None

    def codegen(context, builder, sig, args):
        level = list(args)
        width = 16          # each vector holds 16 // width sums of `width` lanes each, in order
        while width > 1:
            half = width // 2
            low_lanes = [g * width + i for g in range(16 // width) for i in range(half)]
            high_lanes = [g * width + half + i for g in range(16 // width) for i in range(half)]
            merged = []
            for a, b in zip(level[0::2], level[1::2]):
                # a's groups then b's: lanes [a.low halves, b.low halves] + [a.high halves, b.high halves]
                low = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16),
                                                               low_lanes + [16 + x for x in low_lanes]))
                high = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16),
                                                                high_lanes + [16 + x for x in high_lanes]))
                merged.append(builder.fadd(low, high))
            level, width = merged, half
        return level[0]
    return F32x16(*vectors), codegen


@intrinsic
def store_quarter_f32x16(typingctx, array, row, column, vector, quarter):
    """``array[row, column:column + 4] = vector[4 q:4 q + 4]`` for a 2-D float32 array and a constant q (0-3)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.ndim == 2
            and isinstance(row, types.Integer) and isinstance(column, types.Integer) and vector == F32x16
            and isinstance(quarter, types.IntegerLiteral) and 0 <= quarter.literal_value < 4):
        return None
    q = quarter.literal_value
    contiguous = array.layout == "C"

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i64 = ir.IntType(64)
        strides = cgutils.unpack_tuple(builder, ary.strides, 2)
        r, c = (context.cast(builder, v, t, types.int64) for v, t in zip(args[1:3], sig.args[1:3]))
        base = builder.ptrtoint(ary.data, i64)
        at = builder.add(base, builder.add(builder.mul(r, strides[0]), builder.mul(c, strides[1])))
        quarter_lanes = ir.Constant(ir.VectorType(_I32, 4), [4 * q + i for i in range(4)])
        lanes = builder.shuffle_vector(args[3], args[3], quarter_lanes)
        if contiguous:
            builder.store(lanes, builder.inttoptr(at, ir.VectorType(ir.FloatType(), 4).as_pointer()), align=4)
        else:
            for i in range(4):
                lane_at = builder.add(at, builder.mul(i64(i), strides[1]))
                pointer = builder.inttoptr(lane_at, ir.FloatType().as_pointer())
                builder.store(builder.extract_element(lanes, _I32(i)), pointer, align=4)
        return context.get_dummy_value()
    return types.void(array, row, column, vector, quarter), codegen


@intrinsic
def store_32_bytes(typingctx, array, offset, vector):
    """``array[offset:offset + 32] = vector`` for a byte array and an ``I8x32``."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer) or vector != I8x32:
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(pointer, I8x32.llvm_type().as_pointer()), align=1)
        return context.get_dummy_value()
    return types.void(array, offset, vector), codegen


@intrinsic
def store_halves_f32x8(typingctx, array, index, a, b):
    """``array[index:index + 4] = a``, ``array[index + 4:index + 8] = b`` for a float32 array: the lane scales of
    one 32-value group whose 16-value halves have scales a and b."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.layout == "C"
            and isinstance(index, types.Integer) and isinstance(a, types.Float) and isinstance(b, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        low = _splat_value(builder, context.cast(builder, args[2], sig.args[2], types.float32), 4)
        high = _splat_value(builder, context.cast(builder, args[3], sig.args[3], types.float32), 4)
        lanes = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        builder.store(lanes, builder.bitcast(builder.gep(data, [args[1]]), F32x8.llvm_type().as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(array, index, a, b), codegen


# ----------------------------------------------------------------------------------------------------------------
# The row-interleaved GEMM (gemm.py's prompt kernel): a 512-bit register holds one dword (four values) of each of
# sixteen weight rows, so its int32 lanes are rows and a token's four activation bytes are broadcast to all of them.
# ----------------------------------------------------------------------------------------------------------------

@intrinsic
def splat_dword_x64(typingctx, array, offset):
    """The four bytes at byte ``offset`` of a byte array repeated sixteen times, as an ``I8x64`` (one
    ``vpbroadcastd``, which LLVM folds into the ``vpdpbusd`` that uses it as an embedded broadcast)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _byte_pointer(context, builder, sig.args[0], args[0], args[1])
        dword = builder.load(builder.bitcast(pointer, _I32.as_pointer()), align=1)
        return builder.bitcast(_splat_value(builder, dword, 16), I8x64.llvm_type())
    return I8x64(array, offset), codegen


@intrinsic
def store_f32_lanes(typingctx, array, index, vector, count):
    """``array[index:index + count] = vector[:count]`` for a float32 array, an ``F32x16`` or ``F32x8`` and
    0 <= count <= its lanes (a masked store: nothing past ``count`` is touched)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and array.layout == "C"
            and isinstance(index, types.Integer) and vector in (F32x16, F32x8) and isinstance(count, types.Integer)):
        return None
    n = vector.count

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        pointer = builder.bitcast(builder.gep(data, [args[1]]), vector.llvm_type().as_pointer())
        lanes = ir.Constant(ir.VectorType(_I32, n), list(range(n)))
        limit = _splat_value(builder, context.cast(builder, args[3], sig.args[3], types.int32), n)
        mask = builder.icmp_signed("<", lanes, limit)
        function = _function(builder, f"llvm.masked.store.v{n}f32.p0", ir.VoidType(),
                             [vector.llvm_type(), vector.llvm_type().as_pointer(), _I32,
                              ir.VectorType(ir.IntType(1), n)])
        builder.call(function, [args[2], pointer, _I32(4), mask])
        return context.get_dummy_value()
    return types.void(array, index, vector, count), codegen


@intrinsic
def store_dwords(typingctx, array, offset, stride, vector):
    """The eight dwords of an ``I8x32`` to bytes ``offset``, ``offset + stride``, ... of a byte array (one weight
    row's 32 values into a row-interleaved panel)."""
    if not (_is_byte_array(array) and isinstance(offset, types.Integer) and isinstance(stride, types.Integer)
            and vector == I8x32):
        return None

    def codegen(context, builder, sig, args):
        dwords = builder.bitcast(args[3], ir.VectorType(_I32, 8))
        step = context.cast(builder, args[2], sig.args[2], types.intp)
        at = context.cast(builder, args[1], sig.args[1], types.intp)
        for j in range(8):
            pointer = _byte_pointer(context, builder, sig.args[0], args[0], at)
            builder.store(builder.extract_element(dwords, _I32(j)), builder.bitcast(pointer, _I32.as_pointer()),
                          align=1)
            at = builder.add(at, step)
        return context.get_dummy_value()
    return types.void(array, offset, stride, vector), codegen




# ----------------------------------------------------------------------------------------------------------------
# q2_K / q3_K decode on AVX-512 (decode.py's wide group kernels): one 512-bit register holds group j of both
# halves of a super-block (bytes 0-31: values 32 j .. of the first 128, bytes 32-63: the same of the second), and
# its int32 lanes are folded back to the eight lanes of ``dot_u8_i8`` once per super-block.
# ----------------------------------------------------------------------------------------------------------------

add_i32x16 = _lanewise(I32x16, "add")
add_i32x16.__doc__ = "Lanewise ``a + b`` of two ``I32x16``."
mul_i32x16 = _lanewise(I32x16, "mul")
mul_i32x16.__doc__ = "Lanewise ``a * b`` of two ``I32x16`` (``vpmulld``)."


zero_i32x16 = _zeros(I32x16)


@intrinsic
def as_bytes(typingctx, vector):
    """The bytes of an ``I32x8`` (an ``I8x32``) or of an ``I32x16`` (an ``I8x64``): no instruction."""
    result = {I32x8: I8x32, I32x16: I8x64}.get(vector)
    if result is None:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], result.llvm_type())
    return result(vector), codegen


@intrinsic
def fold_halves_i32x16(typingctx, vector):
    """Lanes 0-7 plus lanes 8-15 of an ``I32x16``, as an ``I32x8`` (exact integer sums)."""
    if vector != I32x16:
        return None

    def codegen(context, builder, sig, args):
        return _fold_halves(builder, args[0])
    return I32x8(vector), codegen


@intrinsic
def bytes_as_i32x16(typingctx, w0, w1, w2, w3, offset):
    """The sixteen bytes of four 32-bit words (little-endian, ``w0``'s bytes first), zero-extended to int32 lanes,
    plus ``offset``: a K-quant super-block's sixteen scales, one per lane."""
    if not all(isinstance(t, types.Integer) for t in (w0, w1, w2, w3, offset)):
        return None

    def codegen(context, builder, sig, args):
        words = ir.Constant(ir.VectorType(_I32, 4), None)
        for i in range(4):
            word = context.cast(builder, args[i], sig.args[i], types.uint32)
            words = builder.insert_element(words, word, _I32(i))
        lanes = builder.zext(builder.bitcast(words, ir.VectorType(_I8, 16)), I32x16.llvm_type())
        offset_value = context.cast(builder, args[4], sig.args[4], types.int32)
        return builder.add(lanes, _splat_value(builder, offset_value, 16))
    return I32x16(w0, w1, w2, w3, offset), codegen


@intrinsic
def spread_scale_pairs(typingctx, scales, j):
    """The scales of group ``j`` of both halves in the lanes of ``dot_u8_i8_x64``: lanes 0-3 ``scales[2j]``, 4-7
    ``scales[2j + 1]`` (values 32 j .. 32 j + 31), 8-11 ``scales[8 + 2j]``, 12-15 ``scales[9 + 2j]`` (the same
    values of the second half); one ``vpermd``."""
    if scales != I32x16 or not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        base = ir.Constant(ir.VectorType(_I32, 16), [0] * 4 + [1] * 4 + [8] * 4 + [9] * 4)
        step = builder.mul(context.cast(builder, args[1], sig.args[1], types.int32), _I32(2))
        index = builder.add(base, _splat_value(builder, step, 16))
        function = _function(builder, "llvm.x86.avx512.permvar.si.512", I32x16.llvm_type(),
                             [I32x16.llvm_type(), I32x16.llvm_type()])
        return builder.call(function, [args[0], index])
    return I32x16(scales, j), codegen


def _word_halves(context, builder, sig, words, offset):
    """``scale_word_halves``' two registers from its sixteen bytes (``words``: any 16-byte LLVM vector)."""
    offset_value = builder.trunc(context.cast(builder, offset, sig.args[-1], types.int32), _I8)
    scale_bytes = builder.add(builder.bitcast(words, ir.VectorType(_I8, 16)), _splat_value(builder, offset_value, 16))
    wide = builder.sext(scale_bytes, ir.VectorType(_I16, 16))
    halves = []
    for first in (0, 8):
        mask = ir.Constant(ir.VectorType(_I32, 16), list(range(first, first + 8)) * 2)
        halves.append(builder.bitcast(builder.shuffle_vector(wide, wide, mask), I32x8.llvm_type()))
    return context.make_tuple(builder, sig.return_type, halves)


@intrinsic
def scale_word_halves(typingctx, w0, w1, w2, w3, offset):
    """The sixteen bytes of four 32-bit words (``bytes_as_i32x16``'s order) plus ``offset``, as signed int16 words in
    two ``I32x8``: scales 0-7 in both 128-bit halves of the first, 8-15 in both halves of the second. From these
    ``group_scale_words`` takes a group's two scales with one in-half ``vpshufb`` (ggml's AVX2 way), where a
    cross-half permute per group (``scale_pair_i32x8``) kept Zen 3's two shuffle pipes busy for most of q2_K's
    loop (``llvm-mca -mcpu=znver3``: 25 cycles a super-block, 18 of them the permutes and widenings)."""
    if not all(isinstance(t, types.Integer) for t in (w0, w1, w2, w3, offset)):
        return None

    def codegen(context, builder, sig, args):
        words = ir.Constant(ir.VectorType(_I32, 4), None)
        for i in range(4):
            words = builder.insert_element(words, context.cast(builder, args[i], sig.args[i], types.uint32), _I32(i))
        return _word_halves(context, builder, sig, words, args[4])
    return types.UniTuple(I32x8, 2)(w0, w1, w2, w3, offset), codegen


@intrinsic
def scale_qword_halves(typingctx, low, high, offset):
    """``scale_word_halves`` of the sixteen bytes of two 64-bit words (``low``'s bytes first), built in general
    registers: two moves into the vector register where four 32-bit words took a ``vmovd`` and three ``vpinsrd`` of
    two operations each (q3_K, whose scales are decoded by integer arithmetic)."""
    if not all(isinstance(t, types.Integer) for t in (low, high, offset)):
        return None

    def codegen(context, builder, sig, args):
        words = ir.Constant(ir.VectorType(ir.IntType(64), 2), None)
        for i in range(2):
            words = builder.insert_element(words, context.cast(builder, args[i], sig.args[i], types.uint64), _I32(i))
        return _word_halves(context, builder, sig, words, args[2])
    return types.UniTuple(I32x8, 2)(low, high, offset), codegen


@intrinsic
def group_scale_words(typingctx, halves, j):
    """The scale words of ``scaled_dot`` for group ``j`` (0-3) of a half super-block, from that half's register of
    ``scale_word_halves``: scale 2j in the int16 words of lanes 0-3, scale 2j + 1 in lanes 4-7. One ``vpshufb``
    (within each 128-bit half; the constant mask once LLVM has unrolled the group loop)."""
    if halves != I32x8 or not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        bytes_type = ir.VectorType(_I8, 32)
        step = builder.trunc(builder.mul(context.cast(builder, args[1], sig.args[1], types.int32), _I32(4)), _I8)
        mask = builder.add(ir.Constant(bytes_type, [0, 1] * 8 + [2, 3] * 8), _splat_value(builder, step, 32))
        function = _function(builder, "llvm.x86.avx2.pshuf.b", bytes_type, [bytes_type, bytes_type])
        return builder.bitcast(builder.call(function, [builder.bitcast(args[0], bytes_type), mask]),
                               I32x8.llvm_type())
    return I32x8(halves, j), codegen


@intrinsic
def word_halves_down(typingctx, halves):
    """Words 4-7 of each 128-bit half of ``halves`` in words 0-3 of that half (``vpshufd``): with
    ``broadcast_scale_word``, eight scales of a ``scale_word_halves`` register reached through four shuffle masks."""
    if halves != I32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_I32, 8), [2, 3, 2, 3, 6, 7, 6, 7]))
    return I32x8(halves), codegen


@intrinsic
def broadcast_scale_word(typingctx, halves, j):
    """Word ``j`` (0-3) of each 128-bit half of ``halves`` in all its words (one ``vpshufb``): a 32-value group's
    one scale as the words of ``scaled_dot``, from a ``scale_word_halves`` register (both halves alike)."""
    if halves != I32x8 or not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        bytes_type = ir.VectorType(_I8, 32)
        step = builder.trunc(builder.mul(context.cast(builder, args[1], sig.args[1], types.int32), _I32(2)), _I8)
        mask = builder.add(ir.Constant(bytes_type, [0, 1] * 16), _splat_value(builder, step, 32))
        function = _function(builder, "llvm.x86.avx2.pshuf.b", bytes_type, [bytes_type, bytes_type])
        return builder.bitcast(builder.call(function, [builder.bitcast(args[0], bytes_type), mask]),
                               I32x8.llvm_type())
    return I32x8(halves, j), codegen


@intrinsic
def word_dot_8(typingctx, words, array, index):
    """The sum of words 0-7 of ``words`` (its first 128-bit half, as int16) times the eight int16 that start at
    int32 ``index`` of the int32 ``array``: one ``vpmaddwd`` and a horizontal sum, an int32 (q4_K / q5_K's mins
    times the activation sums per 32)."""
    if not (words == I32x8 and isinstance(array, types.Array) and array.dtype == types.int32
            and array.layout == "C" and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        word_type = ir.VectorType(_I16, 8)
        low = builder.shuffle_vector(args[0], args[0], ir.Constant(ir.VectorType(_I32, 4), [0, 1, 2, 3]))
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        sums = builder.load(builder.bitcast(builder.gep(data, [args[2]]), word_type.as_pointer()), align=4)
        maddwd = _function(builder, "llvm.x86.sse2.pmadd.wd", ir.VectorType(_I32, 4), [word_type, word_type])
        lanes = builder.call(maddwd, [builder.bitcast(low, word_type), sums])
        pairs = builder.add(lanes, builder.shuffle_vector(lanes, lanes, ir.Constant(ir.VectorType(_I32, 4),
                                                                                     [2, 3, 2, 3])))
        total = builder.add(pairs, builder.shuffle_vector(pairs, pairs, ir.Constant(ir.VectorType(_I32, 4),
                                                                                      [1, 1, 1, 1])))
        return builder.extract_element(total, _I32(0))
    return types.int32(words, array, index), codegen


@intrinsic
def scale_pair_i32x8(typingctx, scales, index):
    """Lanes 0-3 ``scales[index]``, lanes 4-7 ``scales[index + 1]`` of an ``I32x16`` (``index`` even): the two
    16-value scales of a 32-value group in the lanes of ``dot_u8_i8``, from a super-block's sixteen (one
    ``vpermd`` on the half that holds them; a constant shuffle where the index is known)."""
    if scales != I32x16 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        at = context.cast(builder, args[1], sig.args[1], types.int32)
        chosen = builder.select(builder.icmp_signed(">=", at, _I32(8)), _half(builder, args[0], 8),
                                _half(builder, args[0], 0))
        local = _splat_value(builder, builder.and_(at, _I32(7)), 8)
        lanes = builder.add(local, ir.Constant(ir.VectorType(_I32, 8), [0] * 4 + [1] * 4))
        function = _function(builder, "llvm.x86.avx2.permd", I32x8.llvm_type(), [I32x8.llvm_type()] * 2)
        return builder.call(function, [chosen, lanes])
    return I32x8(scales, index), codegen


# ----------------------------------------------------------------------------------------------------------------
# The exact K-quant GEMM (gemm.py's ``gemm_k``): a super-block's integer sums in 16 int32 lanes, each 64 values'
# products taken in pairs (``vpmaddubsw``) and scaled by their group's six-bit scale (``vpdpwssd``); and the
# float work of 16 (row, token) pairs at once, one per lane.
# ----------------------------------------------------------------------------------------------------------------

def _scaled_pair_sums(builder, acc, unsigned, signed, scale_words, vnni: bool, offset_pairs=None):
    """``acc`` plus ``vpmaddubsw``'s pair sums of unsigned x signed bytes (less ``offset_pairs``, when given: the
    pair sums of the weights' offset x signed, computed before, the offset taken out in int16) multiplied by ``scale_words`` and added in pairs into the int32 lanes: ``vpdpwssd`` with ``vnni``
    (AVX512-VNNI, AVX-VNNI), ``vpmaddwd`` and an add on AVX2. 32 or 64 bytes (64: AVX512-VNNI)."""
    n_bytes = unsigned.type.count
    bytes_type, words = ir.VectorType(_I8, n_bytes), ir.VectorType(_I16, n_bytes // 2)
    lanes = ir.VectorType(_I32, n_bytes // 4)
    maddubs = _function(builder, "llvm.x86.avx2.pmadd.ub.sw" if n_bytes == 32 else "llvm.x86.avx512.pmaddubs.w.512",
                        words, [bytes_type, bytes_type])
    pairs = builder.call(maddubs, [unsigned, signed])
    if offset_pairs is not None:
        pairs = builder.sub(pairs, builder.bitcast(offset_pairs, words))
    factors = builder.bitcast(scale_words, words)
    if vnni:
        dpwssd = _function(builder, f"llvm.x86.avx512.vpdpwssd.{n_bytes * 8}", lanes, [lanes, words, words])
        return builder.call(dpwssd, [acc, pairs, factors])
    maddwd = _function(builder, "llvm.x86.avx2.pmadd.wd", lanes, [words, words])
    return builder.add(acc, builder.call(maddwd, [pairs, factors]))


_SCALED_DOT_FORMS = {I32x8: I8x32, I32x16: I8x64}   # accumulator -> bytes


def _scaled_dot_types(acc, unsigned, signed, scale_words, isa) -> bool:
    return (_SCALED_DOT_FORMS.get(acc) is not None and unsigned == signed == _SCALED_DOT_FORMS[acc]
            and scale_words == acc and isinstance(isa, IsaType)
            and (acc == I32x8 or isa.wide))


@intrinsic
def scaled_dot(typingctx, acc, unsigned, signed, scale_words, isa):
    """``acc + scale * (unsigned[4i] * signed[4i] + ... + unsigned[4i + 3] * signed[4i + 3])`` in each int32 lane i,
    ``scale`` the int16 in both halves of lane i of ``scale_words`` (``to_scale_words``): ``vpmaddubsw`` (pair sums in
    int16, exact while they stay within 32767), then ``vpdpwssd`` (AVX512-VNNI) or ``vpmaddwd`` and an add (AVX2):
    ggml's K-quant products, the scale multiplied in by the pair sums' own instruction instead of a ``vpmulld``.
    ``I32x8`` accumulators with 32 bytes (both paths) or ``I32x16`` with 64 (AVX512-VNNI only)."""
    if not _scaled_dot_types(acc, unsigned, signed, scale_words, isa):
        return None
    vnni = isa.vnni

    def codegen(context, builder, sig, args):
        return _scaled_pair_sums(builder, args[0], args[1], args[2], args[3], vnni)
    return acc(acc, unsigned, signed, scale_words, isa), codegen


@intrinsic
def offset_pair_sums(typingctx, offset, signed):
    """``vpmaddubsw``'s pair sums of ``offset`` (a byte, in every position) times the 32 signed bytes ``signed``:
    sixteen int16 in an ``I32x8``, what ``pairs_scaled_dot`` takes off a weight's pair sums (as q6_K's -32),
    computed once per activation row."""
    if not isinstance(offset, types.Integer) or signed != I8x32:
        return None

    def codegen(context, builder, sig, args):
        bytes_type, words = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
        maddubs = _function(builder, "llvm.x86.avx2.pmadd.ub.sw", words, [bytes_type, bytes_type])
        value = builder.trunc(context.cast(builder, args[0], sig.args[0], types.int32), _I8)
        return builder.bitcast(builder.call(maddubs, [_splat_value(builder, value, 32), args[1]]), I32x8.llvm_type())
    return I32x8(offset, signed), codegen


@intrinsic
def pairs_scaled_dot(typingctx, acc, unsigned, signed, offset_pairs, scale_words, isa):
    """``scaled_dot`` of ``unsigned - offset`` (a weight stored with an offset, as q6_K's quants 0..63 for -32..31),
    the offset's pair sums with ``signed`` given (``offset_pair_sums``, computed once per activation row) and taken
    off in int16 before the scale (exact while both pair sums and their difference stay within 32767): one
    ``vpmaddubsw`` a group. ``I32x8`` accumulators."""
    if (acc != I32x8 or unsigned != I8x32 or signed != I8x32 or offset_pairs != I32x8 or scale_words != I32x8
            or not isinstance(isa, IsaType)):
        return None
    vnni = isa.vnni

    def codegen(context, builder, sig, args):
        return _scaled_pair_sums(builder, args[0], args[1], args[2], args[4], vnni, offset_pairs=args[3])
    return I32x8(acc, unsigned, signed, offset_pairs, scale_words, isa), codegen


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
def to_scale_words(typingctx, scales):
    """Each int32 lane of ``scales`` (an ``I32x8`` or ``I32x16`` of values within int16) as an int16 in both halves
    of the lane: the scale words of ``scaled_dot``; an integer gives that word in all eight lanes of an ``I32x8``."""
    if scales not in (I32x8, I32x16) and not isinstance(scales, types.Integer):
        return None
    result = scales if scales in (I32x8, I32x16) else I32x8
    count = result.count

    def codegen(context, builder, sig, args):
        if sig.args[0] in (I32x8, I32x16):
            lanes = args[0]
        else:
            lanes = _splat_value(builder, context.cast(builder, args[0], sig.args[0], types.int32), count)
        low = builder.and_(lanes, _splat(_I32(0xFFFF), count))
        return builder.or_(low, builder.shl(low, _splat(_I32(16), count)))
    return result(scales), codegen


# ----------------------------------------------------------------------------------------------------------------
# Row lanes straight from the file (decode.py's q4_0 / q8_0 kernels on AVX512-VNNI, q4_0 on AVX2): the int32 lanes
# of a 512-bit register are sixteen weight rows (of a 256-bit one, eight), as in the prompt GEMM's panels, but
# built per block from the rows as they lie in the model file (no unpacked panel in memory): 16-byte loads, four
# rows per 512-bit register (two per 256-bit one), a 16 x 4 (8 x 4) dword transpose, the block scales loaded one
# by one.
# ----------------------------------------------------------------------------------------------------------------

def _row_pointer(context, builder, sig, args, row: int):
    """i8* to byte ``offset + row * stride`` of the byte array of an intrinsic called (array, offset, stride)."""
    at = builder.add(args[1], builder.mul(args[2], ir.Constant(args[2].type, row)))
    return _byte_pointer(context, builder, sig.args[0], args[0], at)


def _rows_of_16_bytes(n_rows: int):
    """An intrinsic (array, offset, stride) -> the 16 bytes at byte ``offset`` of ``n_rows`` rows ``stride`` bytes
    apart, side by side (row i in bytes 16 i .. 16 i + 15: one load and an insert from memory per further row)."""
    vector = I8x64 if n_rows == 4 else I8x32

    def make(typingctx, array, offset, stride):
        if not _is_byte_array(array) or not isinstance(offset, types.Integer) or not isinstance(stride, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v16 = ir.VectorType(_I8, 16)
            parts = [builder.load(builder.bitcast(_row_pointer(context, builder, sig, args, i), v16.as_pointer()),
                                  align=1) for i in range(n_rows)]
            while len(parts) > 1:
                width = 2 * parts[0].type.count
                parts = [builder.shuffle_vector(parts[i], parts[i + 1],
                                                ir.Constant(ir.VectorType(_I32, width), list(range(width))))
                         for i in range(0, len(parts), 2)]
            return parts[0]
        return vector(array, offset, stride), codegen
    return intrinsic(make)


load_rows_4x16 = _rows_of_16_bytes(4)
load_rows_4x16.__doc__ = ("The 16 bytes at byte ``offset`` of four rows ``stride`` bytes apart, side by side (an "
                          "``I8x64``: row i in bytes 16 i .. 16 i + 15; one load and three ``vinserti32x4``).")
load_rows_2x16 = _rows_of_16_bytes(2)
load_rows_2x16.__doc__ = ("The 16 bytes at byte ``offset`` of two rows ``stride`` bytes apart, side by side (an "
                          "``I8x32``: one load and a ``vinserti128`` from memory).")


@intrinsic
def transpose_dwords(typingctx, a, b, c, d):
    """Four ``load_rows_4x16`` results (rows 0-3, 4-7, 8-11, 12-15, four dwords each) as four ``I8x64`` whose
    int32 lane r is row r's dword m (m = 0..3): bytes 4 m .. 4 m + 3 of the sixteen rows side by side (a 16 x 4
    transpose of dwords: two rounds of ``vpermt2d``)."""
    if not (a == b == c == d == I8x64):
        return None

    def codegen(context, builder, sig, args):
        words = [builder.bitcast(value, I32x16.llvm_type()) for value in args]
        lanes = ir.VectorType(_I32, 16)
        # round 1, per pair of registers: dword m and m + 1 of their eight rows
        even = ir.Constant(lanes, [0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29])
        odd = ir.Constant(lanes, [2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31])
        ab01, ab23 = (builder.shuffle_vector(words[0], words[1], m) for m in (even, odd))
        cd01, cd23 = (builder.shuffle_vector(words[2], words[3], m) for m in (even, odd))
        # round 2: the sixteen rows of each dword
        low = ir.Constant(lanes, list(range(8)) + list(range(16, 24)))
        high = ir.Constant(lanes, list(range(8, 16)) + list(range(24, 32)))
        out = [builder.shuffle_vector(ab01, cd01, low), builder.shuffle_vector(ab01, cd01, high),
               builder.shuffle_vector(ab23, cd23, low), builder.shuffle_vector(ab23, cd23, high)]
        return context.make_tuple(builder, sig.return_type, [builder.bitcast(v, I8x64.llvm_type()) for v in out])
    return types.UniTuple(I8x64, 4)(a, b, c, d), codegen


@intrinsic
def splat_i32(typingctx, value):
    """An integer in all sixteen lanes of an ``I32x16``."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat_value(builder, _as_i32(builder, args[0]), 16)
    return I32x16(value), codegen


@intrinsic
def splat_f32(typingctx, value):
    """A float32 in all sixteen lanes of an ``F32x16``."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _splat_value(builder, args[0], 16)
    return F32x16(value), codegen


@intrinsic
def flip_sign_bits(typingctx, values):
    """Each byte of an ``I8x64`` xor 0x80: signed bytes as unsigned ones, 128 higher (one ``vpxord``)."""
    if values != I8x64:
        return None

    def codegen(context, builder, sig, args):
        return builder.xor(args[0], _splat(_I8(0x80), 64))
    return I8x64(values), codegen


@intrinsic
def transpose_row_pairs(typingctx, a, b, c, d):
    """Four ``load_rows_2x16`` results, of rows (0, 4), (1, 5), (2, 6) and (3, 7), as four ``I8x32`` whose int32
    lane r is row r's dword m (m = 0..3): the 256-bit form of ``transpose_dwords``, two rounds of in-lane unpacks
    (``vpunpckldq`` / ``vpunpckhdq``, then ``vpunpcklqdq`` / ``vpunpckhqdq``), no lane-crossing shuffle: each
    128-bit half holds four rows from the start."""
    if not (a == b == c == d == I8x32):
        return None

    def codegen(context, builder, sig, args):
        words = [builder.bitcast(value, I32x8.llvm_type()) for value in args]
        lanes = ir.VectorType(_I32, 8)
        low_dwords = ir.Constant(lanes, [0, 8, 1, 9, 4, 12, 5, 13])      # vpunpckldq
        high_dwords = ir.Constant(lanes, [2, 10, 3, 11, 6, 14, 7, 15])   # vpunpckhdq
        low_qwords = ir.Constant(lanes, [0, 1, 8, 9, 4, 5, 12, 13])      # vpunpcklqdq
        high_qwords = ir.Constant(lanes, [2, 3, 10, 11, 6, 7, 14, 15])   # vpunpckhqdq
        # round 1: dwords 0-1 and 2-3 of rows (0, 1 | 4, 5) and (2, 3 | 6, 7), interleaved
        ab01, ab23 = (builder.shuffle_vector(words[0], words[1], m) for m in (low_dwords, high_dwords))
        cd01, cd23 = (builder.shuffle_vector(words[2], words[3], m) for m in (low_dwords, high_dwords))
        # round 2: one dword of rows 0-3 | 4-7
        out = [builder.shuffle_vector(ab01, cd01, low_qwords), builder.shuffle_vector(ab01, cd01, high_qwords),
               builder.shuffle_vector(ab23, cd23, low_qwords), builder.shuffle_vector(ab23, cd23, high_qwords)]
        return context.make_tuple(builder, sig.return_type, [builder.bitcast(v, I8x32.llvm_type()) for v in out])
    return types.UniTuple(I8x32, 4)(a, b, c, d), codegen


def _block_sums_x8(registers_per_sum: int):
    """An intrinsic (start, values, array, offset, isa) -> ``start`` + each of eight rows' exact block sum:
    ``values`` holds eight ``I8x32`` whose int32 lane r is four of row r's 32 values (register j: values 4 j ..
    4 j + 3); the block's 32 activations are the signed bytes at byte ``offset`` of ``array``, dword j broadcast
    against register j. With 256-bit VNNI (AVX-VNNI): one ``vpdpbusd`` a register, in two chains. AVX2 has no
    ``vpdpbusd``: ``vpmaddubsw`` a register, whose int16 pair sums are added as int16 over ``registers_per_sum``
    registers, then one ``vpmaddwd`` with ones per such sum, so each row's 32 products cost about two instructions a
    register instead of ``dot_u8_i8``'s three. The same exact sums either way."""
    def make(typingctx, start, values, array, offset, isa):
        if not (isinstance(start, types.Integer) and values == types.UniTuple(I8x32, 8) and _is_byte_array(array)
                and isinstance(offset, types.Integer) and isinstance(isa, IsaType)):
            return None
        vnni = isa.vnni

        def codegen(context, builder, sig, args):
            bytes_type = ir.VectorType(_I8, 32)
            pairs_type = ir.VectorType(_I16, 16)
            at = context.cast(builder, args[3], sig.args[3], types.intp)
            broadcasts = []
            for j in range(8):
                pointer = _byte_pointer(context, builder, sig.args[2], args[2], builder.add(at, at.type(4 * j)))
                dword = builder.load(builder.bitcast(pointer, _I32.as_pointer()), align=1)
                broadcasts.append(builder.bitcast(_splat_value(builder, dword, 8), bytes_type))
            start_lanes = _splat_value(builder, _as_i32(builder, args[0]), 8)
            if vnni:
                chains = [start_lanes, ir.Constant(I32x8.llvm_type(), None)]
                for j in range(8):
                    chains[j % 2] = _vpdpbusd(builder, chains[j % 2], builder.extract_value(args[1], j),
                                              broadcasts[j])
                return builder.add(chains[0], chains[1])
            maddubs = _function(builder, "llvm.x86.avx2.pmadd.ub.sw", pairs_type, [bytes_type, bytes_type])
            maddwd = _function(builder, "llvm.x86.avx2.pmadd.wd", I32x8.llvm_type(), [pairs_type, pairs_type])
            sums = start_lanes
            for first in range(0, 8, registers_per_sum):
                total = None
                for j in range(first, first + registers_per_sum):
                    pairs = builder.call(maddubs, [builder.extract_value(args[1], j), broadcasts[j]])
                    total = pairs if total is None else builder.add(total, pairs)
                sums = builder.add(sums, builder.call(maddwd, [total, _splat(_I16(1), 16)]))
            return sums
        return I32x8(start, values, array, offset, isa), codegen
    return intrinsic(make)


# q4_0's values (0..15): sixteen products of at most 15 * 128 per int16 word over all eight registers, 30720, under
# 32767, so nothing saturates or wraps and one vpmaddwd widens them
nibble_block_sums_x8 = _block_sums_x8(8)
nibble_block_sums_x8.__doc__ = ("``start`` + each of eight rows' exact block sum of values 0..15 (q4_0, q4_1): eight "
                                "registers summed as int16, one ``vpmaddwd`` on AVX2 (see ``_block_sums_x8``).")
# q5_0's values (0..31): eight products of at most 31 * 128 per word over four registers, 31744
five_bit_block_sums_x8 = _block_sums_x8(4)
five_bit_block_sums_x8.__doc__ = ("``start`` + each of eight rows' exact block sum of values 0..31 (q5_0, q5_1): two "
                                  "int16 sums of four registers, two ``vpmaddwd`` on AVX2 (see ``_block_sums_x8``).")


@intrinsic
def load_u32_8_rows(typingctx, array, offset, stride):
    """The 32-bit words at byte ``offset`` of eight rows ``stride`` bytes apart, row r in lane r of an ``I32x8``
    (q5_0's fifth bits in row lanes), gathered in general registers two to a 64-bit word before the vector register
    (as ``load_f16_8_rows`` gathers scales: LLVM's one ``vpinsrd`` from memory per row costs load and shuffle
    slots both)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer) or not isinstance(stride, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        vector = ir.Constant(ir.VectorType(i64, 4), None)
        for pair in range(4):
            word = None
            for r in (2 * pair, 2 * pair + 1):
                pointer = _row_pointer(context, builder, sig, args, r)
                bits = builder.zext(builder.load(builder.bitcast(pointer, _I32.as_pointer()), align=1), i64)
                word = bits if word is None else builder.or_(word, builder.shl(bits, i64(32)))
            vector = builder.insert_element(vector, word, _I32(pair))
        return builder.bitcast(vector, I32x8.llvm_type())
    return I32x8(array, offset, stride), codegen


@intrinsic
def fifth_bits_x8(typingctx, high_bits, j):
    """q5_0's fifth bits as 16 or 0 for register j (0-7, a constant) of row lanes: byte i of lane r is 16 where bit
    4 j + i of lane r of ``high_bits`` (``load_u32_8_rows``: each row's 32 fifth bits) is set. One in-half
    ``vpshufb`` spreads byte j // 2 of each lane to its four bytes (the same for registers 2 m and 2 m + 1), then a
    mask of the four bits, a compare and a mask of 16: ``bits_to_bytes`` with each lane's own bits."""
    if high_bits != I32x8 or not isinstance(j, types.IntegerLiteral):
        return None
    register = j.literal_value
    if not 0 <= register < 8:
        return None

    def codegen(context, builder, sig, args):
        bytes_type = ir.VectorType(_I8, 32)
        spread = builder.shuffle_vector(builder.bitcast(args[0], bytes_type), ir.Constant(bytes_type, None),
                                        ir.Constant(ir.VectorType(_I32, 32),
                                                    [4 * r + register // 2 for r in range(8) for _ in range(4)]))
        bits = ir.Constant(bytes_type, [1 << (4 * (register % 2) + i) for _ in range(8) for i in range(4)])
        is_set = builder.icmp_unsigned("==", builder.and_(spread, bits), bits)
        return builder.select(is_set, _splat(_I8(16), 32), ir.Constant(bytes_type, None))
    return I8x32(high_bits, j), codegen


def _f16_rows_in_words(context, builder, sig, args, n_rows):
    """The half floats at byte ``offset`` of ``n_rows`` rows ``stride`` bytes apart as float32 (exact), gathered in
    general registers: each half's bits loaded as an integer and shifted into a 64-bit word with three others; the
    words go to a vector register together before ``vcvtph2ps``. LLVM builds such a vector from memory by one
    ``vpinsrw`` per half, and each took three slots of Zen 3 / Zen 4's two load / store-data pipes (llvm-mca): with
    their unpacks, half of a q4_0 block's time in row lanes."""
    i64 = ir.IntType(64)
    words = []
    for first in range(0, n_rows, 4):
        word = None
        for r in range(first, first + 4):
            pointer = _row_pointer(context, builder, sig, args, r)
            bits = builder.zext(builder.load(builder.bitcast(pointer, _I16.as_pointer()), align=1), i64)
            bits = bits if r == first else builder.shl(bits, i64(16 * (r - first)))
            word = bits if word is None else builder.or_(word, bits)
        words.append(word)
    vector = ir.Constant(ir.VectorType(i64, len(words)), None)
    for i, word in enumerate(words):
        vector = builder.insert_element(vector, word, _I32(i))
    halves = builder.bitcast(vector, ir.VectorType(ir.HalfType(), n_rows))
    return builder.fpext(halves, ir.VectorType(_F32, n_rows))


@intrinsic
def load_f16_rows(typingctx, array, offset, stride):
    """The half floats at byte ``offset`` of sixteen rows ``stride`` bytes apart, as an ``F32x16`` (exact), gathered
    in general registers (``_f16_rows_in_words``). A ``vpgatherdd`` of their dwords was slower on Zen 4 (one core,
    q4_0 rows from memory: 20-21 against 22-23 GB/s for sixteen ``vpinsrw``)."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer) or not isinstance(stride, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _f16_rows_in_words(context, builder, sig, args, 16)
    return F32x16(array, offset, stride), codegen


@intrinsic
def load_f16_8_rows(typingctx, array, offset, stride):
    """``load_f16_rows`` for eight rows, as an ``F32x8``."""
    if not _is_byte_array(array) or not isinstance(offset, types.Integer) or not isinstance(stride, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _f16_rows_in_words(context, builder, sig, args, 8)
    return F32x8(array, offset, stride), codegen


_LANE_INTS = {F32x16: I32x16, F32x8: I32x8}


def _lane_floats(isa: IsaType) -> VectorType:
    """The row-lane kernels' float register on path ``isa``: sixteen rows where it is wide, else eight."""
    return F32x16 if isa.wide else F32x8


@intrinsic
def lane_rows(typingctx, isa):
    """The weight rows of a row-lane register on path ``isa``: 16 (AVX512-VNNI) or 8 (AVX-VNNI, AVX2), a constant."""
    if not isinstance(isa, IsaType):
        return None
    rows = _lane_floats(isa).count

    def codegen(context, builder, sig, args):
        return ir.IntType(64)(rows)
    return types.int64(isa), codegen


def _lane_zeros(floats: bool):
    def make(typingctx, isa):
        if not isinstance(isa, IsaType):
            return None
        vector = _lane_floats(isa) if floats else _LANE_INTS[_lane_floats(isa)]

        def codegen(context, builder, sig, args):
            return ir.Constant(vector.llvm_type(), None)
        return vector(isa), codegen
    return intrinsic(make)


zero_lanes = _lane_zeros(floats=True)
zero_lanes.__doc__ = "Float zeros in a row-lane register of path ``isa``: an ``F32x16`` or an ``F32x8``."
zero_lane_ints = _lane_zeros(floats=False)
zero_lane_ints.__doc__ = "Int32 zeros in a row-lane register of path ``isa``: an ``I32x16`` or an ``I32x8``."


@intrinsic
def fma_lanes(typingctx, acc, dot, scales, scale):
    """``acc + float(dot) * (scales * scale)`` lanewise (``vcvtdq2ps``, ``vmulps`` with ``scale`` broadcast,
    ``vfmadd``): a block's exact row sums scaled by each row's scale and the token's, on either width (``F32x16``
    with ``I32x16``, ``F32x8`` with ``I32x8``), so both paths' row lanes give the same bits. ``scale`` is a float32
    or already in every lane (``splat_lane_floats``: a broadcast load that LLVM folds into the multiply). ``dot``
    may also be float lanes already (of ``acc``'s type): no conversion then."""
    if (acc not in _LANE_INTS or dot not in (_LANE_INTS[acc], acc) or scales != acc
            or scale not in (types.float32, acc)):
        return None

    def codegen(context, builder, sig, args):
        vector = sig.args[0].llvm_type()
        floats = args[1] if sig.args[1] == sig.args[0] else builder.sitofp(args[1], vector)
        lanes = args[3] if sig.args[3] == sig.args[0] else _splat_value(builder, args[3], vector.count)
        products = builder.fmul(args[2], lanes)
        function = _function(builder, f"llvm.fma.v{vector.count}f32", vector, [vector] * 3)
        return builder.call(function, [floats, products, args[0]])
    return acc(acc, dot, scales, scale), codegen


def _lane_load(floats: bool, broadcast: bool = False):
    """``_typed_load`` into a row-lane register of path ``isa`` (``f(array, index, isa)``): float32 or int32
    lanes, sixteen where the path is wide, else eight."""
    def make(typingctx, array, index, isa):
        if not isinstance(isa, IsaType):
            return None
        vector = _lane_floats(isa) if floats else _LANE_INTS[_lane_floats(isa)]
        if not _is_typed_array(array, types.float32 if floats else types.int32, index):
            return None
        return vector(array, index, isa), _typed_load_codegen(vector, broadcast)
    return intrinsic(make)


load_lane_floats = _lane_load(floats=True)
load_lane_floats.__doc__ = "``array[index:index + n]`` of a float32 array in a row-lane register of path ``isa``."
splat_lane_floats = _lane_load(floats=True, broadcast=True)
splat_lane_floats.__doc__ = "``array[index]`` of a float32 array in every lane of a row-lane register of ``isa``."
splat_lane_ints = _lane_load(floats=False, broadcast=True)
splat_lane_ints.__doc__ = "``array[index]`` of an int32 array in every int32 lane of a row-lane register of ``isa``."


def _lanes_multiply_add(negate: bool):
    """An intrinsic (acc, a, b) -> ``acc - a * b`` (negate) or ``acc + a * b`` lanewise: one ``vfnmadd`` /
    ``vfmadd`` on either width of the row lanes."""
    def make(typingctx, acc, a, b):
        if acc not in _LANE_INTS or a != acc or b != acc:
            return None

        def codegen(context, builder, sig, args):
            vector = sig.args[0].llvm_type()
            function = _function(builder, f"llvm.fma.v{vector.count}f32", vector, [vector] * 3)
            return builder.call(function, [builder.fneg(args[1]) if negate else args[1], args[2], args[0]])
        return acc(acc, a, b), codegen
    return intrinsic(make)


fnma_lanes = _lanes_multiply_add(negate=True)
fnma_lanes.__doc__ = "``acc - a * b`` lanewise (one ``vfnmadd``), on either width of the row lanes."
fma_float_lanes = _lanes_multiply_add(negate=False)
fma_float_lanes.__doc__ = "``acc + a * b`` lanewise (one ``vfmadd``), on either width of the row lanes."


@intrinsic
def has_vnni(typingctx, isa):
    """Whether path ``isa`` has ``vpdpbusd``, as a constant of the compiled kernel (LLVM drops the other branch)."""
    if not isinstance(isa, IsaType):
        return None
    vnni = isa.vnni

    def codegen(context, builder, sig, args):
        return ir.IntType(1)(vnni)
    return types.boolean(isa), codegen


load_lane_ints = _lane_load(floats=False)
load_lane_ints.__doc__ = "``array[index:index + n]`` of an int32 array in a row-lane register of path ``isa``."


@intrinsic
def add_lanes(typingctx, a, b):
    """``a + b`` lanewise for two int32 row-lane registers of one width."""
    if a not in (I32x16, I32x8) or b != a:
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])
    return a(a, b), codegen


@intrinsic
def half_sums(typingctx, q):
    """The sums of the signed bytes 0-15 and 16-31 of an ``I8x32``, as two int32 (exact)."""
    if q != I8x32:
        return None

    def codegen(context, builder, sig, args):
        values = builder.sext(args[0], ir.VectorType(_I32, 32))
        half_type = ir.VectorType(_I32, 16)
        reduce_add = _function(builder, "llvm.vector.reduce.add.v16i32", _I32, [half_type])
        sums = []
        for half in (0, 1):
            lanes = ir.Constant(half_type, list(range(16 * half, 16 * half + 16)))
            part = builder.shuffle_vector(values, values, lanes)
            sums.append(builder.call(reduce_add, [part]))
        return context.make_tuple(builder, sig.return_type, sums)
    return types.UniTuple(types.int32, 2)(q), codegen


def _panel_column_and_values(context, builder, sig, args, n_lanes: int):
    """The operands of the panel dot products (acc, panel, offset, values, index, isa): the ``4 * n_lanes`` panel
    bytes at byte ``offset`` (four of each row) and the four bytes ``values[index:index + 4]`` broadcast to every
    lane, both as byte vectors."""
    bytes_type = ir.VectorType(_I8, 4 * n_lanes)
    row_bytes = _byte_pointer(context, builder, sig.args[1], args[1], args[2])
    rows = builder.load(builder.bitcast(row_bytes, bytes_type.as_pointer()), align=1)
    value_bytes = _byte_pointer(context, builder, sig.args[3], args[3], args[4])
    dword = builder.load(builder.bitcast(value_bytes, _I32.as_pointer()), align=1)
    return rows, builder.bitcast(_splat_value(builder, dword, n_lanes), bytes_type)


@intrinsic
def dot_panel_dword(typingctx, acc, panel, offset, values, index, isa):
    """``acc`` plus, in each int32 lane (a weight row of a row-interleaved panel), the products of that row's four
    bytes at byte ``offset + 4 * lane`` of ``panel`` with the four bytes ``values[index:index + 4]`` (broadcast to
    every lane). On the VNNI paths the panel's bytes are unsigned and the values signed: one ``vpdpbusd``, on 64
    bytes where the path is wide (sixteen rows; the broadcast becomes its embedded broadcast), else on 32 (eight
    rows, AVX-VNNI). On AVX2 the values are unsigned and the panel's bytes signed: ``vpmaddubsw`` then ``vpmaddwd``
    with ones (exact while no pair of products passes 32767: values up to 255 times bytes of at most 32 in
    magnitude stay within 16320)."""
    if not (isinstance(isa, IsaType) and _is_byte_array(panel) and _is_byte_array(values)
            and isinstance(offset, types.Integer) and isinstance(index, types.Integer)):
        return None
    lanes = _LANE_INTS[_lane_floats(isa)]
    if acc != lanes:
        return None
    vnni = isa.vnni

    def codegen(context, builder, sig, args):
        rows, broadcast = _panel_column_and_values(context, builder, sig, args, lanes.count)
        if vnni:
            return _vpdpbusd(builder, args[0], rows, broadcast)
        return builder.add(args[0], _avx2_quad_sums(builder, broadcast, rows))
    return lanes(acc, panel, offset, values, index, isa), codegen


@intrinsic
def dot_signed_panel_dword(typingctx, acc, panel, offset, values, index, isa):
    """``dot_panel_dword`` for a panel of signed bytes and signed values on AVX2 (eight rows): ``vpmaddubsw`` on
    the panel's absolute values and the values with the panel's signs (``vpsignb``, ggml's ``mul_sum_i8_pairs``),
    then ``vpmaddwd`` with ones; exact for values within -127..127 (a pair at most 2 x 128 x 127)."""
    if not (isinstance(isa, IsaType) and not isa.wide and _is_byte_array(panel) and _is_byte_array(values)
            and isinstance(offset, types.Integer) and isinstance(index, types.Integer) and acc == I32x8):
        return None

    def codegen(context, builder, sig, args):
        rows, broadcast = _panel_column_and_values(context, builder, sig, args, 8)
        return builder.add(args[0], _avx2_signed_quad_sums(builder, rows, broadcast))
    return I32x8(acc, panel, offset, values, index, isa), codegen
