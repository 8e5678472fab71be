"""Per-core speed of the one-token kernels beside the memory read bandwidth of one core.

Decode streams every weight byte once per token, so a kernel that computes slower than one core reads memory
leaves speed on the table. Measured on one thread by the CPU time of the calling thread (best of N), which other
jobs on a shared machine disturb far less than wall time; each type's weights (4096 x 4096, random blocks with
sane scales) are cycled in copies totalling >= 64 MB so that they come from memory, not cache.

``python -m ggml_backend.cli.bench_kernels [--json] [--types q4_0,q6_K]``; ``ggml-backend bench`` runs it in a
fresh process and prints its table. ``GGML_BACKEND_KERNELS`` picks the kernel path as in the engine.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

CYCLE_BYTES = 64e6
SHAPE = (4096, 4096)

# Byte offsets of the half-float scales in each type's block (random bytes elsewhere are valid quants, but random
# halves can be NaN or huge).
SCALE_OFFSETS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0],
                 "q2_K": [80, 82], "q3_K": [108], "q4_K": [0, 2], "q5_K": [0, 2], "q6_K": [208]}
TYPES = tuple(SCALE_OFFSETS)


def random_weights(type_name: str, n_rows: int, k: int, rng) -> np.ndarray:
    """Random block bytes [n_rows, row_bytes] of ``type_name`` with half-float scales of 0.01."""
    from ..quant.types import get_type
    qtype = get_type(type_name)
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


def kernel_gbps(type_name: str, repeats: int = 5, rng=None) -> float:
    """Weight bytes per second of ``type_name``'s one-token kernel on one thread."""
    from ..quant.matmul import matmul
    rng = rng if rng is not None else np.random.default_rng(0)
    weights = random_weights(type_name, *SHAPE, rng)
    copies = [weights.copy() for _ in range(max(1, int(-(-CYCLE_BYTES // weights.nbytes))))]
    x = rng.standard_normal((1, SHAPE[1])).astype(np.float32)
    out = np.empty((1, SHAPE[0]), np.float32)

    def run_all():
        for copy in copies:
            matmul(type_name, copy, x, out=out, method="int")

    return weights.nbytes * len(copies) / best_thread_time(run_all, repeats) / 1e9


def kernel_report(types=TYPES, repeats: int = 5) -> dict:
    """{"kernel_path": ..., "read_gbps": one core's read bandwidth, "kernels": {type: GB/s per core}}."""
    import numba

    from ..quant.matmul import KERNEL_ISA, prompt_path
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    report = {"kernel_path": KERNEL_ISA.name if KERNEL_ISA is not None else "generic",
              "prompt_path": prompt_path(), "read_gbps": memory_read_gbps()}
    report["kernels"] = {type_name: kernel_gbps(type_name, repeats, rng) for type_name in types}
    return report


def format_report(report: dict) -> str:
    read = report["read_gbps"]
    lines = [f"prompts on {report.get('prompt_path', '?')}",
             f"decode kernels ({report['kernel_path']} path), one core: memory read {read:.1f} GB/s",
             f"{'type':<8}{'GB/s':>8}{'of read':>9}"]
    for type_name, gbps in report["kernels"].items():
        lines.append(f"{type_name:<8}{gbps:>8.1f}{gbps / read:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated types (default: all)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in SCALE_OFFSETS]
    if unknown or args.repeat < 1:
        parser.error(f"unknown types {unknown}; known: {', '.join(TYPES)}" if unknown else "--repeat must be >= 1")
    report = kernel_report(types, args.repeat)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
