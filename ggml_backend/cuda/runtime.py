"""Finding CUDA: importing numba's CUDA target, choosing the device, and how big the launches are.

Nothing here imports ``numba.cuda`` at module import time: a machine without CUDA never pays for it, and the
engine asks ``cuda_status()`` only when ``n_gpu_layers`` is not 0.

numba's CUDA target comes from the ``numba-cuda`` package (the ``cuda`` extra; numba's own bundled copy is
deprecated). ``NUMBA_ENABLE_CUDASIM=1`` swaps it for numba's CUDA simulator, which runs every kernel on the CPU,
one Python thread per CUDA thread: the same code path, slowly. The tests use it (tests/test_cuda_sim.py).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

NO_CUDA_MESSAGE = "no CUDA GPU found: running on the CPU"
_said_no_cuda = False


def simulated() -> bool:
    """Whether numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1)."""
    import numba
    return bool(int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0)) or bool(numba.config.ENABLE_CUDASIM)


def import_cuda():
    """``numba.cuda``, or None when it cannot be imported. numba.cuda of numba <= 0.61 still names
    ``np.row_stack``, which numpy 2.4 removed: the alias is put back first (it is what numpy deprecated it for)."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
    if simulated():
        import numba
        numba.config.ENABLE_CUDASIM = 1   # read by numba.cuda when it is first imported
        # the simulator's threads meet at every syncthreads through the GIL: with Python's default 5 ms switch
        # interval each barrier costs milliseconds (a decode step of a tiny model: minutes instead of seconds)
        sys.setswitchinterval(min(sys.getswitchinterval(), 1e-5))
    try:
        from numba import cuda
    except Exception:   # a missing or broken CUDA toolkit shows up as any kind of import error
        return None
    if simulated():
        _lock_simulator_shared_arrays()
    return cuda


def _lock_simulator_shared_arrays() -> None:
    """numba's simulator finds a block's shared array by the source line that asks for it, with a lookup and an
    insert that two threads can interleave: both then allocate, and each gets an array of its own (uninitialised,
    so a reduction through it returns garbage now and then). The same lookup under a lock makes the threads of a
    block share the array, as on a GPU."""
    import threading

    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support
    from numba.core import types
    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_locked", False):
        return
    unlocked = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:            # dynamic shared memory: one buffer, no lookup
            return unlocked(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)   # the simulator's own key: the asking line
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = np.empty(shape, dtype)
        return found
    array._locked = True
    shared.array = array


@dataclass
class CudaStatus:
    available: bool
    reason: str = ""          # why not, when not available
    n_devices: int = 0
    simulator: bool = False


def cuda_status() -> CudaStatus:
    """Whether a CUDA GPU (or the simulator) is there to run on."""
    cuda = import_cuda()
    if cuda is None:
        return CudaStatus(False, "numba's CUDA target is not installed (pip install \"ggml-backend[cuda]\")")
    sim = simulated()
    try:
        if not cuda.is_available():
            return CudaStatus(False, "no CUDA driver or device")
        n = len(cuda.gpus)
    except Exception as error:   # a driver that fails to initialise
        return CudaStatus(False, f"CUDA failed to initialise: {error}")
    return CudaStatus(n > 0, "" if n else "no CUDA device", n, sim)


def say_no_cuda(reason: str = "") -> None:
    """Print the no-CUDA message once per process (each load with -ngl would otherwise repeat it)."""
    global _said_no_cuda
    if not _said_no_cuda:
        _said_no_cuda = True
        print(f"ggml_backend: {NO_CUDA_MESSAGE}" + (f" ({reason})" if reason else ""), file=sys.stderr)


def select_device(main_gpu: int):
    """Make GPU ``main_gpu`` the current device; returns (name, free bytes, total bytes)."""
    cuda = import_cuda()
    n = len(cuda.gpus)
    if not 0 <= main_gpu < n:
        raise ValueError(f"main_gpu {main_gpu} does not exist: this machine has {n} CUDA device(s), 0..{n - 1}")
    device = cuda.select_device(main_gpu)
    name = getattr(device, "name", b"CUDA device")
    name = name.decode() if isinstance(name, bytes) else str(name)
    free, total = cuda.current_context().get_memory_info()
    if simulated():
        name = "numba CUDA simulator"
    return name, free, total


@dataclass(frozen=True)
class LaunchShape:
    """How kernels are launched. Every kernel loops over its work items with a grid stride and over the items'
    parts with a block stride, so any shape gives the same numbers; only the speed differs. On a GPU: many
    blocks of a warp or more; in the simulator (a Python thread per CUDA thread, ~20 ms per block) one block
    of two threads, or a decode step of the smallest model would take minutes."""
    blocks: int          # upper bound on blocks per launch
    threads: int         # threads per block of the row-reducing kernels (a power of two, <= MAX_THREADS)
    tile: int            # the GEMM's square tile (threads per block: tile * tile)


MAX_THREADS = 128        # size of the kernels' shared reduction arrays
GPU_LAUNCH = LaunchShape(blocks=65536, threads=32, tile=16)
SIM_LAUNCH = LaunchShape(blocks=1, threads=2, tile=2)


def launch_shape() -> LaunchShape:
    return SIM_LAUNCH if simulated() else GPU_LAUNCH


# --- CUDA graphs ------------------------------------------------------------------------------------------------
# numba launches each kernel from Python (about 35 us a launch on an H200 host), so a decode step of a few hundred
# small kernels costs far more in launches than on the GPU. Captured once into a CUDA graph, a step is replayed with
# one driver call (under a microsecond a kernel). numba has no graph API; the driver's comes with numba-cuda
# (cuda.bindings), and numba's launches on a stream being captured are recorded like any other.

def graphs_enabled() -> bool:
    """Decode steps replayed as CUDA graphs: on a real GPU, unless GGML_BACKEND_CUDA_GRAPHS=0."""
    return not simulated() and os.environ.get("GGML_BACKEND_CUDA_GRAPHS", "1") != "0"


def _driver_call(result):
    from cuda.bindings import driver
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1]
        raise RuntimeError(f"CUDA driver call failed: {name.decode() if isinstance(name, bytes) else name}")
    return result[1] if len(result) > 1 else None


def _stream_handle(stream):
    from cuda.bindings import driver
    handle = stream.handle
    return handle if isinstance(handle, driver.CUstream) else driver.CUstream(int(getattr(handle, "value", handle)))


class CudaGraph:
    """The launches ``record()`` makes on ``stream``, captured once (nothing runs while capturing) and replayed by
    ``launch()``. ``record`` must not allocate device memory or copy from the host."""

    def __init__(self, stream, record):
        from cuda.bindings import driver
        cuda = import_cuda()
        self.stream = stream
        handle = _stream_handle(stream)
        _driver_call(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED))
        try:
            with cuda.defer_cleanup():        # no frees while capturing (numba's pending deallocations)
                self.result = record()
        finally:
            graph = _driver_call(driver.cuStreamEndCapture(handle))   # ends the capture whatever happened
        self._graph = graph
        self._exec = _driver_call(driver.cuGraphInstantiate(graph, 0))
        self._handle = handle

    def launch(self) -> None:
        from cuda.bindings import driver
        _driver_call(driver.cuGraphLaunch(self._exec, self._handle))

    def __del__(self):
        try:
            from cuda.bindings import driver
            driver.cuGraphExecDestroy(self._exec)
            driver.cuGraphDestroy(self._graph)
        except Exception:   # noqa: BLE001 - at interpreter exit the driver may be gone already
            pass


# --- cuBLAS, through CuPy, for prompts ----------------------------------------------------------------------------
# A prompt's products (48 tokens or more) are GEMMs on bands of dequantized rows; CuPy hands them to cuBLAS, whose
# float32 GEMM is far faster than the numba tiled kernel (gemm.py), which stays for machines without CuPy and for
# the simulator. CuPy is optional (`pip install cupy-cuda12x`, or the wheel of the machine's CUDA); float32 stays
# float32 (CuPy uses TF32 only when CUPY_TF32=1 is set).

def import_cupy():
    """CuPy, or None: in the simulator, with GGML_BACKEND_CUBLAS=0, or when it cannot be imported."""
    if simulated() or os.environ.get("GGML_BACKEND_CUBLAS", "1") == "0":
        return None
    try:
        import cupy
        return cupy
    except Exception:   # not installed, or built for another CUDA
        return None
