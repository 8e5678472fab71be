"""Speed of the reference quantizers (ggml_backend.quant.quantize) beside llama.cpp's own (ggml_quantize_chunk
through ctypes, importance matrix NULL: the same quantize_row_*_ref code that llama_model_quantize runs).

Run:  python benchmarks/bench_quantize.py [--rows 1024] [--row-len 4096] [--repeat 3] [--types q4_K,q6_K]

Per type, values per second (best of --repeat):
- "per core": one thread, timed by the process's CPU time, which other jobs on a shared machine disturb far less
  than wall time; ours and llama.cpp's, and their ratio;
- "wall, N thr": wall time with --threads threads: ours on numba's thread count, llama.cpp on as many Python
  threads each quantizing its own rows (ctypes drops the GIL; llama_model_quantize splits a tensor the same way);
- "7B": minutes a 7B model (6.7e9 values) takes at our per-core rate on --threads idle cores.
It also checks that both gave the same bytes. Without llama-cpp-python only our columns print.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ggml_backend import quant  # noqa: E402
from llamacpp_quantize import available, ggml_quantize, version  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
VALUES_7B = 6.7e9


def best_time(fn, repeat: int, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def ours(name: str, x: np.ndarray, threads: int) -> np.ndarray:
    numba.set_num_threads(threads)
    return quant.quantize(name, x)


def theirs(name: str, x: np.ndarray, threads: int) -> np.ndarray:
    if threads == 1:
        return ggml_quantize(name, x)
    bands = np.array_split(x, threads)
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(lambda band: ggml_quantize(name, band), bands)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--row-len", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, numba.config.NUMBA_NUM_THREADS))
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()
    types = [quant.get_type(name).name for name in args.types.split(",")]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.row_len)) * rng.exponential(0.02, (args.rows, 1))).astype(np.float32)
    have_llama, why = available()
    print(f"{x.size:,} float32 values ({args.rows} x {args.row_len}); cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}; numba {numba.__version__}, threading layer "
          f"{numba.config.THREADING_LAYER}")
    print(f"llama.cpp: {version() if have_llama else 'not available: ' + why}")
    t = args.threads
    header = f"{'type':6} {'ours/core':>11}"
    if have_llama:
        header += f" {'ggml/core':>11} {'ours/ggml':>9}"
    header += f" {f'ours wall {t}thr':>15}"
    if have_llama:
        header += f" {f'ggml wall {t}thr':>15} {'same':>5}"
    print(header + f" {f'7B on {t} cores':>14}   (values/s)")
    for name in types:
        ours(name, x[:1], 1)                        # compile (or load from numba's cache) outside the timing
        per_core = x.size / best_time(lambda: ours(name, x, 1), args.repeat, time.process_time)
        line = f"{name:6} {per_core:11.3e}"
        if have_llama:
            theirs_per_core = x.size / best_time(lambda: theirs(name, x, 1), args.repeat, time.process_time)
            line += f" {theirs_per_core:11.3e} {per_core / theirs_per_core:9.2f}"
        line += f" {x.size / best_time(lambda: ours(name, x, t), args.repeat):15.3e}"
        if have_llama:
            same = np.array_equal(ours(name, x, t), theirs(name, x, t))
            line += f" {x.size / best_time(lambda: theirs(name, x, t), args.repeat):15.3e} {'yes' if same else 'NO':>5}"
        print(line + f" {VALUES_7B / (per_core * t) / 60:10.1f} min", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
