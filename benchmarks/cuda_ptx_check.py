"""Compile every GPU-offload kernel (ggml_backend/cuda) to PTX for sm_90 (H200) with numba-cuda's NVVM, on a
machine without a GPU: the typing and lowering of the real CUDA target, which numba's simulator (plain Python)
does not exercise. Prints each kernel's PTX size and FMA count (fused multiply-adds are where the device's
float results may differ from the CPU's by an ulp); for the mat-vec kernels (the new one and v1) also the
local-memory references, dp4a instructions and global loads by width.

    python -m venv --system-site-packages /tmp/ncuda && /tmp/ncuda/bin/pip install "numba-cuda[cu12]"
    PYTHONPATH=. /tmp/ncuda/bin/python benchmarks/cuda_ptx_check.py

Exit status 1 when a kernel does not compile.
"""
import sys
import time
from ggml_backend.cuda.runtime import import_cuda
cuda = import_cuda()
print("numba.cuda:", cuda.__file__)
# no GPU here: device functions are compiled for the compute capability the dispatcher asks the current device
# for; tell it sm_90 (the H200's) instead
import types as _types
import numba.cuda.dispatcher as _dispatcher
_dispatcher.get_current_device = lambda: _types.SimpleNamespace(compute_capability=(9, 0))
from numba import types as T
from ggml_backend.cuda import blocks, matvec, gemm, ops, quantize
from ggml_backend.cuda.kernels import DEVICE_TYPES


def A(dtype, ndim):          # a C-contiguous array argument
    return T.Array(dtype, ndim, "C")


def A_any(dtype, ndim):      # a view (a slice of a device array)
    return T.Array(dtype, ndim, "A")



f32, u8, i8, i32, u16, i64, f64 = T.float32, T.uint8, T.int8, T.int32, T.uint16, T.int64, T.float64
jobs = []
for name, dt in DEVICE_TYPES.items():
    kind = dt.kind
    if kind in (blocks.F32, blocks.F16, blocks.BF16):
        wt = A(f32, 2) if kind == blocks.F32 else A(u16, 2)
        jobs.append((f"float matvec {name}", matvec.float_matvec_kernel(kind),
                     (wt, A(f32, 2), A(f32, 1), A(f32, 2))))
    else:
        xs = A(i32, 2) if dt.vec_dot_type == "q8_K" else A(f32, 2)
        for label, make in (("matvec", matvec.matvec_kernel), ("matvec v1", matvec.matvec_kernel_v1)):
            jobs.append((f"{label} {name}", make(kind), (A(u8, 2), A(i8, 2), A(f32, 2), xs, A(f32, 1), A(f32, 2))))
        wt = A(u8, 2)
    jobs.append((f"dequantize {name}", matvec.dequantize_kernel(kind), (wt, i64, A_any(f32, 2))))
jobs += [
    ("gemm 16", gemm.gemm_kernel(16), (A(f32, 2), A_any(f32, 2), A_any(f32, 1), i64, A(f32, 2))),
    ("q8_0", quantize.quantize_q8_0_kernel, (A(f32, 2), A(i8, 2), A(f32, 2), A(f32, 2))),
    ("q8_0 warp", quantize.quantize_q8_0_warp_kernel, (A(f32, 2), A(i8, 2), A(f32, 2), A(f32, 2))),
    ("q8_K", quantize.quantize_q8_K_kernel, (A(f32, 2), A(i8, 2), A(f32, 2), A(i32, 2))),
    ("round rows", quantize.round_rows_kernel, (A(f32, 2), A(f32, 2), T.boolean)),
    ("rms", ops.rms_norm_kernel, (A(f32, 2), A(f32, 1), f32, A(f32, 2))),
    ("add", ops.add_kernel, (A(f32, 2), A(f32, 2))),
    ("swiglu", ops.swiglu_kernel, (A(f32, 2), A(f32, 2))),
    ("geglu", ops.geglu_kernel, (A(f32, 2), A(f32, 2))),
    ("gather", ops.gather_rows_kernel, (A(f32, 2), A(i64, 1), A(f32, 2))),
    ("copy columns", ops.copy_columns_kernel, (A(f32, 2), i64, A(f32, 2))),
    ("rope", ops.rope_kernel, (A_any(f32, 3), A(f32, 2), A(f32, 2), i64, T.boolean)),
    ("store f16", ops.store_kv_kernel, (A_any(f32, 3), A(u16, 3), A(i32, 1), i64, T.boolean)),
    ("store f32", ops.store_kv_kernel, (A_any(f32, 3), A(f32, 3), A(i32, 1), i64, T.boolean)),
    ("store q8_0", ops.store_kv_q8_0_kernel, (A(f32, 2), A(i8, 3), A(u16, 3), A(i32, 1), i64)),
    ("q8_0 round trip", ops.q8_0_round_trip_kernel, (A(f32, 2),)),
    ("rotate", ops.rotate_kernel, (A(f32, 2), A(f32, 2), A(f32, 2))),
]
for keys, values in ((u16, u16), (f32, f32), (i8, i8), (i8, f32)):
    jobs.append((f"attention {keys}/{values}", ops.attention_kernel,
                 (A_any(f32, 3), A(keys, 3), A(u16, 3), A(values, 3), A(u16, 3), i64, i64, A(f32, 2), A_any(f32, 2),
                  A(i32, 1), i64, i64, i64, f32)))
# attention's three phases (kernels.launch_attention), per cache storage type
for storage in (u16, f32, i8):
    jobs.append((f"attn scores {storage}", ops.attention_scores_kernel,
                 (A_any(f32, 3), A(storage, 3), A(u16, 3), i64, A(f32, 2), A(i32, 1), i64, i64, i64, f32)))
    jobs.append((f"attn values {storage}", ops.attention_values_kernel,
                 (A(f32, 2), A(storage, 3), A(u16, 3), i64, A_any(f32, 2), A(i32, 1), i64, i64, i64)))
jobs.append(("attn softmax", ops.attention_softmax_kernel, (A(f32, 2), i64, A(i32, 1), i64, i64, i64, i64)))



def attention_counts(ptx):
    """What attention's kernels are after: no local memory, shuffles for the scores, cvt.f32.f16 for halves (no
    float64 ldexp), and their global loads by width."""
    loads = {width: ptx.count(f"ld.global.{width}") for width in ("f32", "u16", "s8", "u8", "f64")}
    return (f"  local: {ptx.count('.local')}  shfl: {ptx.count('shfl.sync')}  cvt.f32.f16: {ptx.count('cvt.f32.f16')}"
            f"  f64 ops: {ptx.count('.f64')}  bar: {ptx.count('bar.sync')}  loads: "
            + " ".join(f"{width} {n}" for width, n in loads.items() if n))


def matvec_counts(ptx):
    """What the mat-vec kernels are after: no local memory, wide loads, dp4a."""
    loads = {width: ptx.count(f"ld.global.{width}") for width in ("v4.u32", "u32", "s32", "u16", "u8", "s8")}
    return (f"  local: {ptx.count('.local')}  dp4a: {ptx.count('dp4a.')}  loads: "
            + " ".join(f"{width} {n}" for width, n in loads.items() if n))


failed = 0
for name, disp, sig in jobs:
    t0 = time.time()
    try:
        ptx, resty = cuda.compile_ptx(disp.py_func, sig, cc=(9, 0))
        print(f"ok   {name:<22} {len(ptx):>8} chars PTX  {time.time() - t0:.1f}s  fma: {ptx.count('fma.rn.f32')}"
              + (matvec_counts(ptx) if name.startswith("matvec") else "")
              + (attention_counts(ptx) if name.startswith("att") else ""))
    except Exception as exc:   # noqa: BLE001 - every kernel is tried; the failures are listed
        failed += 1
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:1500]}")
print(f"{len(jobs) - failed} of {len(jobs)} kernels compiled for sm_90")
sys.exit(1 if failed else 0)
