"""Per-core speed of the one-token kernels beside the memory read bandwidth of one core.

Decode streams every weight byte once per token, so a kernel that computes slower than one core reads memory
leaves speed on the table. Measured on one thread by the CPU time of the calling thread (best of N), which other
jobs on a shared machine disturb far less than wall time; each type's weights (4096 x 4096, random blocks with
sane scales) are cycled in copies totalling >= 64 MB so that they come from memory, not cache.

With ``--threads N`` (N > 1) it also measures what N threads gain over one, by wall time, the two alternating:
memory read (vector loads in numba's threads, the same code on one thread and on N) and each type's kernel over
the same copies: the most a decode step made of that kernel could gain on this machine (its cores, its memory),
beside which the bench's whole-step figure shows what the rest of a step (attention, the work between products)
costs.

``python -m ggml_backend.cli.bench_kernels [--json] [--types q4_0,q6_K] [--threads N]``; ``ggml-backend bench``
runs it in a fresh process (with its ``-t``) and prints its table. ``GGML_BACKEND_KERNELS`` picks the kernel path as
in the engine.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from numba import njit, prange

from ..quant.simd import load_32_bytes, or_bytes, store_32_bytes

CYCLE_BYTES = 64e6
SHAPE = (4096, 4096)

# Byte offsets of the half-float scales in each type's block (random bytes elsewhere are valid quants, but random
# halves can be NaN or huge).
SCALE_OFFSETS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0],
                 "q2_K": [80, 82], "q3_K": [108], "q4_K": [0, 2], "q5_K": [0, 2], "q6_K": [208]}
# The plain float types: random normal values (scale 0.02) in their storage
FLOAT_TYPES = ("f16", "bf16", "f32")
TYPES = tuple(SCALE_OFFSETS) + FLOAT_TYPES


def random_weights(type_name: str, n_rows: int, k: int, rng) -> np.ndarray:
    """Random block bytes [n_rows, row_bytes] of ``type_name`` with half-float scales of 0.01 (a layout no file
    holds: its file type's random blocks, re-laid; a float type: normal values times 0.02)."""
    from ..quant.layouts import relayout_of
    from ..quant.types import get_type
    qtype = get_type(type_name)
    if type_name in FLOAT_TYPES:
        values = (rng.standard_normal((n_rows, k)) * 0.02).astype(np.float32)
        return qtype.from_float(values.reshape(-1)).reshape(n_rows, -1)
    if qtype.file_type:
        return relayout_of(qtype, random_weights(qtype.file_type, n_rows, k, rng))
    n_blocks = k // qtype.block_size
    data = rng.integers(0, 256, size=(n_rows, n_blocks, qtype.type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    for offset in SCALE_OFFSETS[type_name]:
        data[:, :, offset:offset + 2] = scale
    return data.reshape(n_rows, n_blocks * qtype.type_size)


def best_thread_time(fn, repeats: int, clock=time.thread_time) -> float:
    """Best CPU time of the calling thread (or of another ``clock``) over ``repeats`` calls, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def memory_read_gbps(n_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """GB/s at which one core reads memory: numpy's (single-threaded, SIMD) sum over ``n_bytes`` of float32."""
    values = np.ones(n_bytes // 4, np.float32)
    return n_bytes / best_thread_time(values.sum, repeats) / 1e9


def _kernel_pass(type_name: str, rng):
    """(a function running ``type_name``'s one-token kernel over copies of random weights, their bytes), in the
    layout the engine runs that type in on this CPU (quant/layouts.py: q3_K's planes on AVX2)."""
    from ..quant.layouts import relaid
    from ..quant.matmul import matmul
    run_type, weights = relaid(type_name, random_weights(type_name, *SHAPE, rng))
    copies = [weights.copy() for _ in range(max(1, int(-(-CYCLE_BYTES // weights.nbytes))))]
    x = rng.standard_normal((1, SHAPE[1])).astype(np.float32)
    out = np.empty((1, SHAPE[0]), np.float32)

    def run_all():
        for copy in copies:
            matmul(run_type, copy, x, out=out, method="int")

    return run_all, weights.nbytes * len(copies)


@njit(cache=True)
def _read_chunk(data, first, last, out, c):
    """Bytes first..last of ``data`` (multiples of 128 apart) read by 32-byte vector loads into four OR chains;
    their OR at out[32 c:]."""
    acc0 = load_32_bytes(data, first)
    acc1 = load_32_bytes(data, first + 32)
    acc2 = load_32_bytes(data, first + 64)
    acc3 = load_32_bytes(data, first + 96)
    for at in range(first + 128, last, 128):
        acc0 = or_bytes(acc0, load_32_bytes(data, at))
        acc1 = or_bytes(acc1, load_32_bytes(data, at + 32))
        acc2 = or_bytes(acc2, load_32_bytes(data, at + 64))
        acc3 = or_bytes(acc3, load_32_bytes(data, at + 96))
    store_32_bytes(out, 32 * c, or_bytes(or_bytes(acc0, acc1), or_bytes(acc2, acc3)))


@njit(parallel=True, cache=True)
def _parallel_read(data, n_chunks):
    """Every byte of ``data`` read once by vector loads, in ``n_chunks`` pieces, one prange iteration each (numba's
    threads); the OR of all. ``data.size`` must be a multiple of 128 * n_chunks (the loads do not check)."""
    out = np.zeros(32 * n_chunks, np.uint8)
    size = data.size // n_chunks
    for c in prange(n_chunks):
        _read_chunk(data, c * size, (c + 1) * size, out, c)
    every = np.uint8(0)
    for i in range(out.size):
        every |= out[i]
    return every


def simd_read_gbps(threads: int = 1, repeats: int = 3, n_bytes: int = 1 << 30) -> tuple:
    """GB/s at which one thread and ``threads`` threads read memory by 32-byte vector loads (``_parallel_read``),
    best wall times, the two alternating: (one, N). numpy's sum (``memory_read_gbps``) is bound by its pairwise
    float additions below that on some CPUs (an AVX2 EPYC Zen 4 VM: 20 GB/s against 31)."""
    n_chunks = 4 * threads
    n_read = n_bytes // (128 * n_chunks) * 128 * n_chunks    # _parallel_read's chunks: whole 128-byte steps
    if n_read == 0:
        raise ValueError(f"{n_bytes} bytes are too few to read in {n_chunks} chunks")
    data = np.ones(n_read, np.uint8)
    return tuple(n_read / wall / 1e9 for wall in
                 _alternating_walls(lambda: _parallel_read(data, n_chunks), threads, repeats))


def _alternating_walls(fn, threads: int, repeats: int) -> tuple:
    """Best wall times of ``fn`` on one thread and on ``threads`` (numba's), the two alternating, after a warm-up
    of each: (one, N), the same value twice where ``threads`` is 1."""
    import numba
    counts = (1, threads) if threads > 1 else (1,)
    best = dict.fromkeys(counts, float("inf"))
    for n in counts:
        numba.set_num_threads(n)
        fn()
    for _ in range(repeats):
        for n in counts:
            numba.set_num_threads(n)
            start = time.perf_counter()
            fn()
            best[n] = min(best[n], time.perf_counter() - start)
    numba.set_num_threads(1)
    return best[1], best[threads]


def kernel_report(types=TYPES, repeats: int = 5, threads: int = 1) -> dict:
    """{"kernel_path": ..., "read_gbps": one core's read bandwidth (numpy's sum), "simd_read_gbps": the same by
    vector loads, "kernels": {type: GB/s per core}, "layouts": {type: the layout no file holds it runs in on this
    CPU (quant/layouts.py), for the types re-laid at load}}; with ``threads`` > 1 also "thread_scaling": {"threads": N,
    "read_gbps": [one, N] by vector loads, "kernels": {type: [GB/s on one, on N]}}, by wall time, the two
    alternating, over the same weights as the one-core figure."""
    import numba

    from ..quant.matmul import KERNEL_ISA, prompt_path
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    wall_repeats = max(1, min(repeats, 3))
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    report = {"kernel_path": KERNEL_ISA.name if KERNEL_ISA is not None else "generic",
              "prompt_path": prompt_path(), "read_gbps": memory_read_gbps()}
    one, many = simd_read_gbps(threads, wall_repeats)
    report["simd_read_gbps"] = one
    scaling = {"threads": threads, "read_gbps": [one, many], "kernels": {}} if threads > 1 else None
    report["kernels"] = {}
    from ..quant.layouts import run_layout
    report["layouts"] = {name: layout for name, layout in ((name, run_layout(name).name) for name in types)
                         if layout != name}
    for type_name in types:
        run_all, n_bytes = _kernel_pass(type_name, rng)
        numba.set_num_threads(1)
        report["kernels"][type_name] = n_bytes / best_thread_time(run_all, repeats) / 1e9
        if scaling:
            one, many = _alternating_walls(run_all, threads, wall_repeats)
            scaling["kernels"][type_name] = [n_bytes / one / 1e9, n_bytes / many / 1e9]
    if scaling:
        report["thread_scaling"] = scaling
    return report


def format_report(report: dict) -> str:
    read = report["read_gbps"]
    scaling = report.get("thread_scaling")
    head = f"decode kernels ({report['kernel_path']} path), one core: memory read {read:.1f} GB/s (numpy's sum)"
    if "simd_read_gbps" in report:
        head += f", {report['simd_read_gbps']:.1f} GB/s by vector loads"
    lines = [f"prompts on {report.get('prompt_path', '?')}", head]
    columns = f"{'type':<8}{'GB/s':>8}{'of read':>9}"
    if scaling:
        n = scaling["threads"]
        one, many = scaling["read_gbps"]
        lines.append(f"{n} threads against one (wall time, alternating): memory read by vector loads {many:.1f} "
                     f"against {one:.1f} GB/s ({many / one:.2f}x); each kernel below")
        columns += f"{f'{n} threads':>12}{'x one':>7}"
    lines.append(columns)
    for type_name, gbps, of_read, many, gain in kernel_rows(report):
        lines.append(f"{type_name:<8}{gbps:>8.1f}{of_read:>9.2f}" + (f"{many:>12.1f}{gain:>7.2f}" if many else ""))
    if report.get("layouts"):
        lines.append(layouts_note(report))
    return "\n".join(lines)


def layouts_note(report: dict) -> str:
    """The line naming the types that ran re-laid at load (as the engine runs them on this CPU)."""
    return "re-laid at load (quant/layouts.py), as the engine runs them here: " + ", ".join(
        f"{name} as {layout}" for name, layout in report["layouts"].items())


def kernel_rows(report: dict) -> list[tuple]:
    """The kernel table's rows, for the text and Markdown reports: (type, GB/s on one core, that over numpy's read,
    GB/s on the report's N threads, their gain over one thread), the last two None without ``thread_scaling``."""
    scaling = (report.get("thread_scaling") or {}).get("kernels", {})
    rows = []
    for type_name, gbps in report["kernels"].items():
        one, many = scaling.get(type_name, (None, None))
        rows.append((type_name, gbps, gbps / report["read_gbps"], many, many / one if many else None))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated types (default: all)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="also measure N threads against one (memory read and each kernel, wall time)")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown or args.repeat < 1 or args.threads < 1:
        parser.error(f"unknown types {unknown}; known: {', '.join(TYPES)}" if unknown else
                     "--repeat must be >= 1" if args.repeat < 1 else "--threads must be >= 1")
    report = kernel_report(types, args.repeat, args.threads)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
