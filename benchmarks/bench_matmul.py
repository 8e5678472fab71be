"""Micro-benchmark of ggml_backend.quant.matmul on the shapes of Qwen2.5-0.5B (q4_K_M).

Decode (one token): GB/s of weight bytes streamed, for the three shapes that dominate a token.
Prefill (many tokens): GFLOP/s (2*n_rows*k*n_tokens per product) of the integer path and of the BLAS path
(dequantize a band of W to float32 + numpy sgemm), and the largest difference between the two.

Run:  python benchmarks/bench_matmul.py [--threads 2] [--quick] [--per-core]

``--per-core``: the decode kernels on one thread, timed by the CPU time of the calling thread (best of N), which
a machine shared with other jobs disturbs far less than wall time; GB/s per core. Each shape cycles through copies
of its weights totalling >= 64 MB, so the bytes come from memory (or L3), not L2, as in a real model's token.

numba's threading layer is the engine's (ggml_backend/_threading.py: tbb, else omp with passive waiting) unless
NUMBA_THREADING_LAYER is set.
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from ggml_backend.cli.bench_kernels import best_thread_time, random_weights
from ggml_backend.quant.matmul import matmul

# (type, n_rows, k): attention/ffn shapes of Qwen2.5-0.5B-Instruct q4_K_M
DECODE_SHAPES = [("q5_0", 4864, 896), ("q6_K", 896, 4864), ("q8_0", 151936, 896),
                 ("q4_K", 896, 4864)]
PREFILL_SHAPES = [("q5_0", 4864, 896), ("q4_K", 896, 4864), ("q6_K", 896, 4864), ("q8_0", 896, 896)]


def best_time(fn, repeats: int) -> float:
    return best_thread_time(fn, repeats, clock=time.perf_counter)


# ffn shapes of a TinyLlama-1B-shaped file (n_embd 2048, n_ff 5632) for the legacy nibble formats
PER_CORE_EXTRA_SHAPES = [("q5_0", 896, 4864), ("q4_0", 5632, 2048), ("q4_0", 2048, 5632), ("q4_1", 5632, 2048),
                         ("q5_1", 5632, 2048)]
CYCLE_BYTES = 64e6


def decode_per_core(rng, repeats: int) -> None:
    numba.set_num_threads(1)
    print("decode kernels, one thread, CPU time of the calling thread (best of %d), weights cycled through "
          ">= %d MB:" % (repeats, CYCLE_BYTES / 1e6))
    for type_name, n_rows, k in DECODE_SHAPES + PER_CORE_EXTRA_SHAPES:
        weights = random_weights(type_name, n_rows, k, rng)
        copies = [weights.copy() for _ in range(max(1, int(-(-CYCLE_BYTES // weights.nbytes))))]
        x = rng.standard_normal((1, k)).astype(np.float32)
        out = np.empty((1, n_rows), np.float32)

        def run_all():
            for copy in copies:
                matmul(type_name, copy, x, out=out, method="int")

        seconds = best_thread_time(run_all, repeats) / len(copies)
        print(f"  {type_name:5s} {n_rows:6d}x{k:<5d} {weights.nbytes / 1e6:7.1f} MB  {seconds * 1e3:7.3f} ms  "
              f"{weights.nbytes / seconds / 1e9:6.1f} GB/s per core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    parser.add_argument("--per-core", action="store_true",
                        help="only the decode kernels, one thread, CPU time (robust on a shared machine)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    repeats = 3 if args.quick else 10
    if args.per_core:
        decode_per_core(rng, max(3, repeats - 1))
        return
    numba.set_num_threads(args.threads)

    print(f"threads={args.threads} threading layer={os.environ.get('NUMBA_THREADING_LAYER', 'engine default')}")
    print("decode (n_tokens=1, integer path):")
    for type_name, n_rows, k in DECODE_SHAPES:
        weights = random_weights(type_name, n_rows, k, rng)
        x = rng.standard_normal((1, k)).astype(np.float32)
        out = np.empty((1, n_rows), np.float32)
        seconds = best_time(lambda: matmul(type_name, weights, x, out=out, method="int"),
                            max(2, repeats // (4 if n_rows > 100000 else 1)))
        print(f"  {type_name:5s} {n_rows:6d}x{k:<5d} {weights.nbytes / 1e6:7.1f} MB  {seconds * 1e3:7.3f} ms  "
              f"{weights.nbytes / seconds / 1e9:6.1f} GB/s")

    print("prefill (integer path vs dequantize+sgemm):")
    for n_tokens in ((32, 128) if args.quick else (32, 128, 512)):
        for type_name, n_rows, k in PREFILL_SHAPES:
            weights = random_weights(type_name, n_rows, k, rng)
            x = rng.standard_normal((n_tokens, k)).astype(np.float32)
            flops = 2.0 * n_rows * k * n_tokens
            t_int = best_time(lambda: matmul(type_name, weights, x, method="int"), max(1, repeats // 3))
            t_blas = best_time(lambda: matmul(type_name, weights, x, method="blas"), max(1, repeats // 3))
            y_int = matmul(type_name, weights, x, method="int")
            y_blas = matmul(type_name, weights, x, method="blas")
            rel = np.abs(y_int - y_blas).max() / np.abs(y_blas).max()
            print(f"  T={n_tokens:4d} {type_name:5s} {n_rows:5d}x{k:<5d} int {flops / t_int / 1e9:6.1f} GFLOP/s  "
                  f"blas {flops / t_blas / 1e9:6.1f} GFLOP/s  max|int-blas|/max|y| {rel:.2e}")


if __name__ == "__main__":
    main()
