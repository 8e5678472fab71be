"""What bounds GPU decode: the cost of one numba kernel launch and of one device allocation from Python, the
mat-vec kernel's own bandwidth (CUDA events, no Python between launches) at several block sizes, and whether
launches can be captured into a CUDA graph and replayed (one launch per step instead of one per kernel).

    python benchmarks/gpu_probe.py [--json FILE]

Run on a machine with an NVIDIA GPU (benchmarks/gpu_h200.sh runs it). Each figure is printed as it is measured,
so a failure later on still leaves the earlier ones.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggml_backend.cuda.runtime import import_cuda  # noqa: E402

RESULTS: dict = {}


def say(key: str, value, text: str) -> None:
    RESULTS[key] = value
    print(text, flush=True)


def launch_overhead(cuda) -> None:
    @cuda.jit
    def empty(x):
        if cuda.grid(1) == 0:
            x[0] += 1.0

    x = cuda.to_device(np.zeros(1, np.float32))
    empty[1, 32](x)
    cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        empty[1, 32](x)
    cuda.synchronize()
    per = (time.perf_counter() - t0) / n
    say("launch_us", per * 1e6, f"empty kernel, launched from Python: {per * 1e6:.1f} us a launch")
    t0 = time.perf_counter()
    for _ in range(n):
        cuda.device_array((1, 4096), np.float32)
    cuda.synchronize()
    per = (time.perf_counter() - t0) / n
    say("device_array_us", per * 1e6, f"cuda.device_array((1, 4096)): {per * 1e6:.1f} us a call")


def matvec_bandwidth(cuda) -> None:
    """The mat-vec kernels alone, timed with CUDA events over 20 launches: matvec_kernel_v1 (a block per item) at
    several block sizes against matvec_kernel (a warp per item, as launch_matvec launches it), in one process.
    A kernel of a few microseconds finishes before Python has launched the next (~35 us), so the launches are
    queued behind a 5 ms wait on the device first and the start event after it: the events then time the
    kernels back to back, not Python."""
    @cuda.jit
    def wait(microseconds):
        for _ in range(microseconds):
            cuda.nanosleep(1000)

    from ggml_backend.cuda.kernels import DeviceActivations, DeviceMatrix
    from ggml_backend.cuda.blocks import Q4_K, Q5_K
    from ggml_backend.cuda.matvec import _aligned, launch_matvec, matvec_kernel_v1
    from ggml_backend.quant.types import get_type
    rng = np.random.default_rng(0)
    cases = [("q4_0", 4096, 4096), ("q4_0", 13824, 5120), ("q4_0", 5120, 13824), ("q6_K", 32000, 5120),
             ("q5_0", 4864, 896), ("q4_K", 4864, 896), ("q4_K", 13824, 5120), ("q8_0", 4096, 4096)]
    for type_name, n_out, n_in in cases:
        row = get_type(type_name)
        pool = row.from_float(rng.standard_normal(256 * 1024, dtype=np.float32) / np.float32(np.sqrt(n_in)))
        n_blocks = n_out * n_in // row.block_size
        data = np.resize(np.asarray(pool, np.uint8), n_blocks * row.type_size)
        matrix = DeviceMatrix(type_name, data, n_out, n_in)
        acts = DeviceActivations(cuda.to_device(rng.standard_normal((1, n_in), dtype=np.float32)))
        form = acts.form(matrix.type.vec_dot_type)
        kind = matrix.type.kind
        outs = {}

        def timed(label, key, launch):
            out = cuda.device_array((1, n_out), np.float32)
            launch(out)
            start, stop = cuda.event(), cuda.event()
            wait[1, 1](5000)
            start.record()
            for _ in range(20):
                launch(out)
            stop.record()
            stop.synchronize()
            seconds = cuda.event_elapsed_time(start, stop) / 1e3 / 20
            gbs = matrix.nbytes / seconds / 1e9
            outs[key] = out.copy_to_host()
            say(f"matvec_{type_name}_{n_out}x{n_in}_{key}", gbs,
                f"mat-vec {type_name} [{n_out} x {n_in}] ({matrix.nbytes / 1e6:.1f} MB), {label}:"
                f" {seconds * 1e6:.1f} us, {gbs:.0f} GB/s")

        kernel = matvec_kernel_v1(kind)
        for threads in (32, 64, 128):
            timed(f"v1, {n_out} blocks of {threads} threads", f"t{threads}",
                  lambda out, threads=threads: kernel[n_out, threads](matrix.w, *form, matrix.bias, out))
        # rows of q4_K / q5_K need 16-byte alignment, others 4: launch_matvec gives other matrices to v1
        v1_fallback = not _aligned(matrix.w, 16 if kind in (Q4_K, Q5_K) else 4)
        label = "v2 (launch_matvec: a warp a row, 4 warps a block)" + (": rows not aligned, v1" if v1_fallback else "")
        timed(label, "v2",
              lambda out: launch_matvec(kind, matrix.w, form[0], form[1], form[2], matrix.bias, out, 1, n_out))
        # the same units and per-unit formulas, summed in another order: equal up to float32 rounding
        scale = float(np.abs(outs["t32"]).max()) or 1.0
        difference = float(np.abs(outs["v2"] - outs["t32"]).max()) / scale
        say(f"matvec_{type_name}_{n_out}x{n_in}_v2_vs_v1", difference,
            f"mat-vec {type_name} [{n_out} x {n_in}]: v2 against v1, largest difference {difference:.1e} of the largest"
            f" output")


def graph_capture(cuda) -> None:
    """Capture 100 launches of a small kernel on a stream into a CUDA graph (driver API through cuda.bindings),
    replay it, check the result, and time a replay against the same launches from Python."""
    from cuda.bindings import driver as drv

    def check(result):
        err = result[0]
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver error {err}")
        return result[1] if len(result) > 1 else None

    @cuda.jit
    def bump(x):
        i = cuda.grid(1)
        if i < x.size:
            x[i] += 1.0

    x = cuda.to_device(np.zeros(1024, np.float32))
    stream = cuda.stream()
    bump[8, 128, stream](x)
    stream.synchronize()
    handle = stream.handle
    if not isinstance(handle, drv.CUstream):
        handle = drv.CUstream(int(getattr(handle, "value", handle)))
    say("stream_handle_type", type(stream.handle).__name__, f"stream handle: {type(stream.handle).__name__}")
    check(drv.cuStreamBeginCapture(handle, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED))
    try:
        for _ in range(100):
            bump[8, 128, stream](x)
    finally:
        graph = check(drv.cuStreamEndCapture(handle))
    exe = check(drv.cuGraphInstantiate(graph, 0))
    check(drv.cuGraphLaunch(exe, handle))
    stream.synchronize()
    value = float(x.copy_to_host()[0])
    say("graph_ok", value == 101.0, f"graph of 100 captured launches replayed: x = {value} (expected 101.0)")
    t0 = time.perf_counter()
    for _ in range(20):
        check(drv.cuGraphLaunch(exe, handle))
    stream.synchronize()
    per_graph = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        for _ in range(100):
            bump[8, 128, stream](x)
    stream.synchronize()
    per_eager = (time.perf_counter() - t0) / 20
    say("graph_100_launches_us", per_graph * 1e6,
        f"100 kernels: {per_graph * 1e6:.0f} us as one graph replay, {per_eager * 1e6:.0f} us launched from Python")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cuda = import_cuda()
    import numba
    say("versions", {"numpy": np.__version__, "numba": numba.__version__, "python": sys.version.split()[0]},
        f"python {sys.version.split()[0]}, numpy {np.__version__}, numba {numba.__version__}, numba.cuda from "
        f"{cuda.__file__}")
    status = 0
    for step in (launch_overhead, matvec_bandwidth, graph_capture):
        try:
            step(cuda)
        except Exception as exc:   # noqa: BLE001 - each probe reports its own failure, the others still run
            status = 1
            say(f"{step.__name__}_error", repr(exc), f"{step.__name__}: FAILED {exc!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
