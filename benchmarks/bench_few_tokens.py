"""Few-token integer kernels (decode.matmul_few) against the one-token kernel, and the prompt path's two methods.

    python benchmarks/bench_few_tokens.py [--tokens 1,4,16] [--repeats 5] [--isa avx512vnni]
    python benchmarks/bench_few_tokens.py --prompt [--tokens 48,128,256,512] [--threads 2]

Default mode: one thread, CPU time of the calling thread (best of N, which a shared machine disturbs far less than
wall time), on Qwen2.5-0.5B's shapes; the weights are cycled through >= 64 MB of copies so they come from memory as
in a real forward pass. Prints, per shape and token count, the time per product, the GB/s of weight bytes read
(once per product) and the GMAC/s (rows x k x tokens per second).

``--prompt``: wall time of ``matmul`` with ``method="int"`` and ``method="blas"`` on ``--threads`` threads for
prompt-sized token counts, per Qwen shape, to place ``BLAS_MIN_TOKENS``.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np

import ggml_backend.quant.matmul as matmul_module
from ggml_backend.cli.bench_kernels import best_thread_time, random_weights
from ggml_backend.quant import simd

# (type, n_rows, k): Qwen2.5-0.5B q4_K_M: q5_0 q/o and ffn gate/up, q6_K/q4_K ffn down, q8_0 (k/v of some layers);
# q4_0 at a 7B's ffn_down and attention shapes (the synthetic 7B files; row lanes on every path)
SHAPES = [("q5_0", 896, 896), ("q5_0", 4864, 896), ("q5_0", 896, 4864), ("q4_K", 896, 4864),
          ("q6_K", 896, 4864), ("q8_0", 4864, 896), ("q4_0", 4864, 896), ("q4_0", 4096, 11008)]
# q4_0's row lanes against sgemm at prompt sizes: on AVX2 they run 8 tokens at 2x the old tiles, so whether
# BLAS_MIN_TOKENS (48) still suits q4_0 there is for an AVX2-only CPU to measure
PROMPT_SHAPES = [("q5_0", 896, 896), ("q5_0", 128, 896), ("q5_0", 4864, 896), ("q4_K", 896, 4864),
                 ("q6_K", 896, 4864), ("q8_0", 151936, 896), ("q4_0", 4096, 4096)]
CYCLE_BYTES = 64e6


def few_tokens(token_counts, repeats, rng) -> None:
    numba.set_num_threads(1)
    print(f"isa {matmul_module.KERNEL_ISA}, one thread, CPU time (best of {repeats}), weights cycled through "
          f">= {CYCLE_BYTES / 1e6:.0f} MB")
    for type_name, n_rows, k in SHAPES:
        weights = random_weights(type_name, n_rows, k, rng)
        copies = [weights.copy() for _ in range(max(1, int(-(-CYCLE_BYTES // weights.nbytes))))]
        line = f"  {type_name:5s} {n_rows:5d}x{k:<5d}"
        for n in token_counts:
            x = rng.standard_normal((n, k)).astype(np.float32)
            out = np.empty((n, n_rows), np.float32)

            def run_all():
                for copy in copies:
                    matmul_module.matmul(type_name, copy, x, out=out, method="int")

            seconds = best_thread_time(run_all, repeats) / len(copies)
            line += (f" | N={n:<3d} {seconds * 1e3:6.3f} ms {weights.nbytes / seconds / 1e9:5.1f} GB/s "
                     f"{n_rows * k * n / seconds / 1e9:5.1f} GMAC/s")
        print(line, flush=True)


def prompt(token_counts, repeats, rng) -> None:
    print(f"isa {matmul_module.KERNEL_ISA}, {numba.get_num_threads()} threads, wall time (best of {repeats}), "
          "ms per product: int | blas")
    for type_name, n_rows, k in PROMPT_SHAPES:
        weights = random_weights(type_name, n_rows, k, rng)
        line = f"  {type_name:5s} {n_rows:6d}x{k:<5d}"
        for n in token_counts:
            x = rng.standard_normal((n, k)).astype(np.float32)
            times = {}
            for method in ("int", "blas"):
                times[method] = best_thread_time(
                    lambda: matmul_module.matmul(type_name, weights, x, method=method), repeats,
                    clock=time.perf_counter)
            line += f" | N={n:<3d} {times['int'] * 1e3:8.2f} {times['blas'] * 1e3:8.2f}"
        print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=None, help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads of --prompt")
    parser.add_argument("--isa", default=None, help="avx512vnni or avx2 (default: the engine's choice)")
    parser.add_argument("--prompt", action="store_true", help="int vs BLAS path at prompt sizes")
    args = parser.parse_args(argv)
    if args.isa:
        matmul_module.KERNEL_ISA = simd.ISAS[args.isa]
    rng = np.random.default_rng(0)
    if args.prompt:
        numba.set_num_threads(args.threads)
        prompt([int(n) for n in (args.tokens or "48,128,256,512").split(",")], args.repeats, rng)
    else:
        few_tokens([int(n) for n in (args.tokens or "1,4,16").split(",")], args.repeats, rng)


if __name__ == "__main__":
    main()
