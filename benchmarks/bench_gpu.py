"""Decode speed with GPU offload: tokens per second and the memory bandwidth that makes, against the GPU's peak.

    python benchmarks/bench_gpu.py                                   # ours, every layer on GPU 0
    python benchmarks/bench_gpu.py --engine llama.cpp                # llama-cpp-python (built with CUDA), the same
    python benchmarks/bench_gpu.py --models 0.5b,7b-q4_0 --gen 64 --json out.json

Models: ``0.5b`` is the default model (Qwen2.5-Coder-0.5B-Instruct, q4_K_M mix), ``SHAPE-TYPE`` a synthetic
Llama of that shape written by ggml_backend.cli.bench_models (shapes 1b, 7b, 13b; types q4_0, q8_0), or a path.

Each model is measured in its own process (its GPU memory is freed at the end; a crash or a hang costs that model
only, under --timeout). In the process: load with n_gpu_layers, one short warm-up (numba compiles each kernel at
its first launch), a prompt of --prompt tokens (timed: prompt tokens/s), then --gen greedy decode steps, each a
forward pass of one token, timed together. Bandwidth: every weight matrix is read once per decode step, so
GB/s = (bytes of the file's weight matrices) x tokens/s, shown beside the GPU's peak (--peak-gbs, 4800 for an
H200's HBM3e).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def model_path(name: str, bench_dir: str | None) -> str:
    if name == "0.5b":
        from ggml_backend.default_model import default_model_path
        return str(default_model_path(progress=False))
    if os.path.exists(name):
        return name
    from ggml_backend.cli.bench_models import synthetic_model
    shape, _, weight_type = name.partition("-")
    return str(synthetic_model(shape, weight_type or "q4_0", bench_dir, progress=False))


@functools.lru_cache(maxsize=None)   # --eager-too measures each model twice: its file is read once
def weight_bytes(path: str) -> int:
    """Bytes of the weight matrices a decode step reads: every 2-D tensor but the token embeddings (of which one
    row per token is read), the output matrix included (tied embeddings: counted once, as the output)."""
    from ggml_backend.formats import load
    tensors = load(path).tensors
    total = sum(t.data.nbytes for name, t in tensors.items() if len(t.shape) == 2 and name != "token_embd.weight")
    if "output.weight" not in tensors:
        total += tensors["token_embd.weight"].data.nbytes
    return total


def measure(engine: str, path: str, n_gpu_layers: int, main_gpu: int, prompt: int, gen: int, n_ctx: int) -> dict:
    """One model, in this process."""
    import numpy as np
    t0 = time.perf_counter()
    if engine == "llama.cpp":
        import llama_cpp
        llm = llama_cpp.Llama(path, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, n_ctx=n_ctx, n_batch=512,
                              verbose=False)
    else:
        from ggml_backend import Llama
        llm = Llama(path, n_gpu_layers=n_gpu_layers, main_gpu=main_gpu, n_ctx=n_ctx, n_batch=512, verbose=True)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    tokens = [1] + [100 + (37 * i) % (n_vocab - 100) for i in range(prompt - 1)]

    def next_token() -> int:
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    t0 = time.perf_counter()
    llm.eval(tokens[:max(prompt, 4)])          # warm-up: the prompt path (GEMM from 48 tokens on) and ...
    llm.eval([next_token()])                   # ... the decode path compile here (ggml_backend: eager, then the
    llm.eval([next_token()])                   # second step is captured as a CUDA graph)
    warmup_s = time.perf_counter() - t0
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - t0
    decode_s = 0.0
    for _ in range(gen):
        token = next_token()
        t0 = time.perf_counter()
        llm.eval([token])
        decode_s += time.perf_counter() - t0
    result = {"load_s": load_s, "warmup_s": warmup_s, "prompt_tokens": prompt, "prompt_tok_s": prompt / prompt_s,
              "gen_tokens": gen, "decode_tok_s": gen / decode_s}
    if engine != "llama.cpp":   # whether the decode steps were replayed as a CUDA graph (ggml_backend/cuda/offload.py)
        graphs = getattr(llm.cache, "_graphs", {}).values()
        result["graph_replayed"] = any(type(g).__name__ == "DecodeGraph" for g in graphs)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("ggml_backend", "llama.cpp"), default="ggml_backend")
    parser.add_argument("--models", default="0.5b,7b-q4_0,13b-q4_0")
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1)
    parser.add_argument("-mg", "--main-gpu", type=int, default=0)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--gen", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--peak-gbs", type=float, default=4800.0, help="the GPU's memory bandwidth (H200: 4800)")
    parser.add_argument("--bench-dir", default=None, help="where synthetic models are written and reused")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one model may take")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--eager-too", action="store_true",
                        help="each model also with GGML_BACKEND_CUDA_GRAPHS=0 (every kernel launched from Python)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:   # one model, in this process: its figures on one RESULT line
        result = measure(args.engine, args.worker, args.n_gpu_layers, args.main_gpu, args.prompt, args.gen,
                         args.ctx_size)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    results = []
    print(f"engine {args.engine}, -ngl {args.n_gpu_layers}, prompt {args.prompt}, decode {args.gen} tokens, "
          f"peak {args.peak_gbs:.0f} GB/s")
    print(f"{'model':<40} {'weights GB':>10} {'load s':>7} {'warm-up s':>9} {'prompt tok/s':>12} "
          f"{'decode tok/s':>12} {'GB/s':>8} {'of peak':>8}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs = [(m, "1") for m in models]          # with CUDA graphs first, then (--eager-too) without
    if args.eager_too and args.engine == "ggml_backend":
        runs += [(m, "0") for m in models]
    for name, graphs in runs:
        row = {"model": name, "engine": args.engine}
        label = Path(name).name.removesuffix(".gguf")
        if args.engine == "ggml_backend":
            row["cuda_graphs"] = graphs == "1"
            label += "" if graphs == "1" else " (no graphs)"
        try:
            path = model_path(name, args.bench_dir)
            row["weight_bytes"] = weight_bytes(path)
            cmd = [sys.executable, __file__, "--worker", path, "--engine", args.engine,
                   "-ngl", str(args.n_gpu_layers), "-mg", str(args.main_gpu), "--prompt", str(args.prompt),
                   "--gen", str(args.gen), "-c", str(args.ctx_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, GGML_BACKEND_CUDA_GRAPHS=graphs))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
            row.update(json.loads(lines[0][7:]))
            row["gbs"] = row["weight_bytes"] * row["decode_tok_s"] / 1e9
            row["of_peak"] = row["gbs"] / args.peak_gbs
            print(f"{label:<40} {row['weight_bytes'] / 1e9:>10.2f} {row['load_s']:>7.1f} {row['warmup_s']:>9.1f} "
                  f"{row['prompt_tok_s']:>12.1f} {row['decode_tok_s']:>12.2f} {row['gbs']:>8.1f} "
                  f"{100 * row['of_peak']:>7.2f}%"
                  + ("" if row.get("graph_replayed", True) == row.get("cuda_graphs", True) else "  (graph not used)"),
                  flush=True)
        except subprocess.TimeoutExpired:
            row["error"] = f"over {args.timeout:.0f} s"
            print(f"{label:<40} ERROR {row['error']}", flush=True)
        except Exception as exc:   # noqa: BLE001 - one model's failure is reported, the others still run
            row["error"] = str(exc)
            print(f"{label:<40} ERROR {exc}", flush=True)
        results.append(row)
        if args.json:   # after each model: a run stopped by its time box keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
