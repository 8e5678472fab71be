"""What bounds GPU decode: the cost of one numba kernel launch and of one device allocation from Python, attention's
kernels alone (the one-kernel attention_kernel against the three of kernels.launch_attention), the time of every
kernel of one eager decode step of a 2-layer 13B-shaped model, the mat-vec kernel's own bandwidth (CUDA events, no
Python between launches) at several block sizes, and whether launches can be captured into a CUDA graph and
replayed (one launch per step instead of one per kernel).

    python benchmarks/gpu_probe.py [--json FILE] [--parts attention,profile,...]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_probe.py --tiny    # the attention and profile parts, tiny shapes,
                                                                    # in numba's simulator (a smoke test; no timings)

Run on a machine with an NVIDIA GPU (benchmarks/gpu_h200.sh runs it). Each figure is printed as it is measured,
so a failure later on still leaves the earlier ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ggml_backend.cuda.runtime import import_cuda, simulated  # noqa: E402

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


# --- timing kernels alone -------------------------------------------------------------------------------------

_WAIT = {}


def device_seconds(cuda, launch, repeats: int = 20) -> float:
    """Seconds one ``launch()`` takes on the device: ``repeats`` launches queued behind a 5 ms wait on the device,
    timed by CUDA events (see matvec_bandwidth). In the simulator: one launch by the wall clock."""
    if simulated():
        t0 = time.perf_counter()
        launch()
        return time.perf_counter() - t0
    if "wait" not in _WAIT:
        @cuda.jit
        def wait(microseconds):
            for _ in range(microseconds):
                cuda.nanosleep(1000)
        _WAIT["wait"] = wait
    launch()
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    _WAIT["wait"][1, 1](5000)
    start.record()
    for _ in range(repeats):
        launch()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / repeats


@contextmanager
def kernel_profile(cuda, records: list):
    """Every kernel launched meanwhile (any module: this patches the class of numba's configured launches,
    ``kernel[grid, block, stream]``) bracketed by two CUDA events on its stream, (name, start, stop) appended to
    ``records`` (in the simulator: (name, wall seconds)). Nothing is patched outside the ``with``: no cost
    otherwise."""
    @cuda.jit
    def noop(x):
        pass

    configured = type(noop[1, 1])
    original = configured.__call__
    sim = simulated()

    def name_of(launch):
        function = getattr(getattr(launch, "dispatcher", launch), "py_func", None)
        return getattr(function, "__qualname__", "?").replace(".<locals>.", ":")

    def timed(self, *args):
        if getattr(self, "_device", False):          # the simulator's device-function calls
            return original(self, *args)
        if sim:
            t0 = time.perf_counter()
            result = original(self, *args)
            records.append((name_of(self), time.perf_counter() - t0))
            return result
        stream = getattr(self, "stream", 0) or 0
        start, stop = cuda.event(), cuda.event()
        start.record(stream)
        result = original(self, *args)
        stop.record(stream)
        records.append((name_of(self), start, stop))
        return result

    configured.__call__ = timed
    try:
        yield records
    finally:
        configured.__call__ = original


def profile_table(cuda, records: list) -> dict:
    """{kernel name: (launches, seconds)} of kernel_profile's records, summed, the device synchronized first."""
    cuda.synchronize()
    table: dict = {}
    for record in records:
        seconds = record[1] if len(record) == 2 else record[1].elapsed_time(record[2]) / 1e3
        count, total = table.get(record[0], (0, 0.0))
        table[record[0]] = (count + 1, total + seconds)
    return table


def old_attention_launch(q, keys, values, probs, out, starts, span, group, window, scale, n_keys_max):
    """kernels.launch_attention's arguments, computed by the one-kernel ops.attention_kernel (as before)."""
    from ggml_backend.cuda import kernels as K
    from ggml_backend.cuda.ops import attention_kernel
    n_tokens, n_head, _ = q.shape
    attention_kernel[K._row_launch(n_tokens * n_head)](
        q, keys.data, keys.scales, values.data, values.scales, keys.kind, values.kind, probs, out, starts, span,
        group, window, np.float32(scale))


def attention_timing(cuda, tiny: bool = False) -> None:
    """attention_kernel (a block of 32 threads per head) against launch_attention (scores, softmax, weighted sum)
    for one decode token over an f16 cache, alone on the device, with the largest difference of their outputs;
    then each of the new kernels' share (events around each launch)."""
    from ggml_backend.cuda import kernels as K
    rng = np.random.default_rng(0)
    # (label, heads, KV heads, head_dim, keys, n_ctx): the scratch is as wide as the cache, as in a graph's step
    cases = [("13B-like", 40, 40, 128, 290, 512), ("Gemma-like", 4, 1, 256, 290, 512)]
    if tiny:
        cases = [("tiny", 4, 4, 64, 10, 16), ("tiny-GQA", 4, 1, 256, 7, 16)]
    for label, n_head, n_head_kv, head_dim, n_keys, n_ctx in cases:
        def cache():
            data = np.zeros((n_head_kv, n_ctx, head_dim), np.float16)
            data[:, :n_keys] = rng.standard_normal((n_head_kv, n_keys, head_dim))
            return K.DeviceCacheLayer("f16", data.view(np.uint16), None, False)
        keys, values = cache(), cache()
        q = K.round_to_f16(cuda.to_device(rng.standard_normal((1, n_head, head_dim)).astype(np.float32)))
        starts = K.positions([n_keys - 1])
        probs = cuda.device_array((n_head, n_ctx), np.float32)
        group, scale = n_head // n_head_kv, 1.0 / np.sqrt(head_dim)
        outs, times = {}, {}
        for name, launch in (("old", old_attention_launch), ("new", K.launch_attention)):
            out = cuda.device_array((1, n_head * head_dim), np.float32)
            times[name] = device_seconds(cuda, lambda: launch(q, keys, values, probs, out, starts, 0, group, 0,
                                                              scale, n_ctx))
            outs[name] = out.copy_to_host()
        largest = float(np.abs(outs["old"]).max()) or 1.0
        difference = float(np.abs(outs["new"] - outs["old"]).max()) / largest
        key = f"attention_{label}"
        say(key, {"old_us": times["old"] * 1e6, "new_us": times["new"] * 1e6, "difference": difference},
            f"attention {label} ({n_head} heads on {n_head_kv} KV heads, head_dim {head_dim}, {n_keys} keys, f16):"
            f" old {times['old'] * 1e6:.1f} us, new {times['new'] * 1e6:.1f} us"
            f" ({times['old'] / max(times['new'], 1e-12):.1f}x), largest difference {difference:.1e} of the largest"
            f" output")
        records: list = []
        out = cuda.device_array((1, n_head * head_dim), np.float32)
        with kernel_profile(cuda, records):
            for _ in range(1 if tiny else 10):
                K.launch_attention(q, keys, values, probs, out, starts, 0, group, 0, scale, n_ctx)
        table = profile_table(cuda, records)
        say(f"{key}_phases", {name: seconds / count * 1e6 for name, (count, seconds) in table.items()},
            "  new, each kernel: " + ", ".join(f"{name} {seconds / count * 1e6:.1f} us"
                                                 for name, (count, seconds) in table.items()))


def decode_profile(cuda, tiny: bool = False) -> None:
    """One eager decode step (GGML_BACKEND_CUDA_GRAPHS=0, every layer on the GPU) of a 2-layer model of 13B's
    layer shape (--tiny: a 1-layer toy), after a 256-token prompt: every kernel bracketed by CUDA events
    (kernel_profile), the time per kernel summed over the step; once with launch_attention, once with the
    one-kernel attention_kernel in its place. Per layer, a 13B step is 1/2 of the layers' part of this."""
    from ggml_backend import Llama
    from ggml_backend.cli.bench_models import LlamaShape, bench_models_dir, write_synthetic_gguf
    from ggml_backend.cuda import kernels as K
    if tiny:
        shape, prompt, n_ctx = LlamaShape("probe-tiny", 256, 1, 256, 4, 2, n_vocab=300), 4, 16
    else:
        shape, prompt, n_ctx = LlamaShape("probe-13b-2", 5120, 2, 13824, 40, 40), 256, 512
    path = Path(bench_models_dir()) / f"synthetic-llama-{shape.name}-q4_0.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_synthetic_gguf(path, shape, "q4_0")
        print(f"  wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    before = os.environ.get("GGML_BACKEND_CUDA_GRAPHS")
    os.environ["GGML_BACKEND_CUDA_GRAPHS"] = "0"
    new_launch = K.launch_attention
    try:
        llm = Llama(str(path), n_gpu_layers=-1, n_ctx=n_ctx, n_batch=512, verbose=False)
        tokens = [1] + [100 + (37 * i) % (shape.n_vocab - 100) for i in range(prompt - 1)]
        for label, launch in (("new", new_launch), ("old", old_attention_launch)):
            K.launch_attention = launch
            llm.reset()
            llm.eval(tokens)
            llm.eval([5])            # compiles what the decode path launches
            records: list = []
            t0 = time.perf_counter()
            with kernel_profile(cuda, records):
                llm.eval([6])
            wall = time.perf_counter() - t0
            table = profile_table(cuda, records)
            total = sum(seconds for _, seconds in table.values())
            say(f"decode_profile_{label}", {name: {"launches": count, "us": seconds * 1e6}
                                            for name, (count, seconds) in table.items()},
                f"eager decode step of {shape.name} (q4_0, {prompt}-token prompt), {label} attention: "
                f"{len(records)} launches, kernels {total * 1e6:.0f} us in all, {wall * 1e3:.1f} ms wall:")
            for name, (count, seconds) in sorted(table.items(), key=lambda item: -item[1][1]):
                print(f"  {name:<44} {count:>4} launches {seconds * 1e6:>9.1f} us {100 * seconds / total:5.1f}%",
                      flush=True)
        # the same step replayed as a CUDA graph: the replay's own GPU time (events around the launch) against the
        # wall time of the whole llm.eval (embedding, inputs, replay, logits back, host bookkeeping)
        from ggml_backend.cuda import runtime
        os.environ["GGML_BACKEND_CUDA_GRAPHS"] = "1"
        replays: list = []
        plain_launch = runtime.CudaGraph.launch

        def timed_launch(graph):
            start, stop = cuda.event(), cuda.event()
            start.record(graph.stream)
            plain_launch(graph)
            stop.record(graph.stream)
            replays.append((start, stop))
        llm.reset()
        llm.eval(tokens)
        llm.eval([5])                # eager, then ...
        llm.eval([6])                # ... the step that makes the graph
        runtime.CudaGraph.launch = timed_launch
        try:
            walls = []
            for token in range(7, 15):
                t0 = time.perf_counter()
                llm.eval([token])
                walls.append(time.perf_counter() - t0)
        finally:
            runtime.CudaGraph.launch = plain_launch
        gpu = [cuda.event_elapsed_time(a, b) / 1e3 for a, b in replays]
        if gpu:
            say("decode_graph_step", {"wall_ms": 1e3 * min(walls), "replay_ms": 1e3 * min(gpu)},
                f"graph decode step of {shape.name}: {1e3 * min(walls):.2f} ms wall (best of {len(walls)}), the "
                f"replay {1e3 * min(gpu):.2f} ms on the GPU; the rest is the host's")
        else:
            say("decode_graph_step", None, "graph decode step: no replay happened (the simulator, or a failed capture: see stderr)")
    finally:
        K.launch_attention = new_launch
        if before is None:
            os.environ.pop("GGML_BACKEND_CUDA_GRAPHS", None)
        else:
            os.environ["GGML_BACKEND_CUDA_GRAPHS"] = before


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


# the new parts first: the probe's time box may end the others
PARTS = {"launch": launch_overhead, "attention": attention_timing, "profile": decode_profile,
         "matvec": matvec_bandwidth, "graph": graph_capture}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts, in order (default: {','.join(PARTS)})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes, the attention and profile parts only (a smoke test for the simulator)")
    args = parser.parse_args(argv)
    cuda = import_cuda()
    import numba
    say("versions", {"numpy": np.__version__, "numba": numba.__version__, "python": sys.version.split()[0]},
        f"python {sys.version.split()[0]}, numpy {np.__version__}, numba {numba.__version__}, numba.cuda from "
        f"{cuda.__file__}")
    status = 0
    names = ["attention", "profile"] if args.tiny else [name.strip() for name in args.parts.split(",") if name.strip()]
    for name in names:
        step = PARTS.get(name)
        try:
            if step is None:
                raise ValueError(f"no part {name!r} (parts: {', '.join(PARTS)})")
            if name in ("attention", "profile"):
                step(cuda, tiny=args.tiny)
            else:
                step(cuda)
        except Exception as exc:   # noqa: BLE001 - each probe reports its own failure, the others still run
            status = 1
            say(f"{name}_error", repr(exc), f"{name}: FAILED {exc!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
