"""GPU offload (``n_gpu_layers`` / ``-ngl N``): the last N layers of a model on an NVIDIA GPU, computed by numba
CUDA kernels on the same quantized blocks the file holds.

    runtime.py   finding CUDA (or numba's simulator), choosing the device, launch shapes
    memory.py    the VRAM estimate and check (no CUDA needed)
    blocks.py    reading each quantization type's blocks on the device
    quantize.py  activation quantization (q8_0 / q8_1 / q8_K) and f16 / bf16 rounding
    matvec.py    mat-vec kernels per type (decode) and the dequantization kernel
    gemm.py      the shared-memory tiled GEMM (prompt processing)
    ops.py       RMS norm, RoPE, SwiGLU / GeGLU, residual adds, KV store, attention
    kernels.py   the type -> kernel table and the host-side calls
    offload.py   device layers, the device KV cache, the forward pass through the offloaded layers

Only this module's functions are imported by the rest of the engine, and only when n_gpu_layers is not 0: nothing
imports numba.cuda on a CPU run.
"""
from __future__ import annotations

import sys

from .memory import OffloadPlan, VRAMError, check_vram, plan_offload, resolve_n_gpu_layers
from .runtime import NO_CUDA_MESSAGE, cuda_status, say_no_cuda

__all__ = ["NO_CUDA_MESSAGE", "OffloadPlan", "VRAMError", "check_vram", "cuda_status", "offload_model",
           "plan_offload", "resolve_n_gpu_layers"]


def offload_model(model, n_gpu_layers: int, main_gpu: int = 0, *, n_ctx: int, n_batch: int,
                  cache_types: tuple[str, str] = ("f16", "f16"), verbose: bool = True):
    """Put the last ``n_gpu_layers`` layers of ``model`` (-1: all, and the output layer with them) on GPU
    ``main_gpu`` and set ``model.offload``; returns the GPUOffload, or None when nothing is offloaded. Without
    CUDA: prints "no CUDA GPU found: running on the CPU" once per process and returns None. The VRAM needed is
    printed before anything is uploaded (when verbose); too little is a VRAMError naming how many layers fit."""
    plan = plan_offload(model, n_gpu_layers, n_ctx, n_batch, cache_types)   # checks n_gpu_layers first
    if plan.n_offloaded == 0:
        return None
    status = cuda_status()
    if not status.available:
        say_no_cuda(status.reason)
        return None
    from .runtime import select_device
    name, free, _total = select_device(main_gpu)
    device = f"GPU {main_gpu} ({name})"
    if verbose:
        print(f"ggml_backend: offloading {plan.n_offloaded} of {plan.n_layer} layers"
              f"{' and the output layer' if plan.output_on_device else ''} to {device}: needs {plan.describe()}",
              file=sys.stderr)
    check_vram(plan, free, device)
    from .offload import GPUOffload
    model.offload = GPUOffload(model, plan, device, main_gpu)
    return model.offload
