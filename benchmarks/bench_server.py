#!/usr/bin/env python3
"""Server benchmark: time to first token (p50, p95) and aggregate decode tokens/s at 1, 4, 8 and 16 concurrent
streaming clients, for ``ggml-backend serve`` beside llama-cpp-python's own server on the same model file.

usage: python benchmarks/bench_server.py [-m MODEL] [--clients 1,4,8,16] [--max-tokens 32] [--threads 2]
                                         [--parallel 4] [--engines ours,llama-cpp-python] [--json OUT]

Procedure (the same for both servers, one server running at a time): start it on a loopback port with the same
file, thread count and context per request; warm it up with one request; then for each client count N, N clients
at once each send one streaming ``/v1/chat/completions`` (a different short question each, temperature 0,
``max_tokens`` tokens, end-of-text banned through ``logit_bias`` so every reply has the same length). A client's
time to first token is from sending its request to the first content delta; the aggregate rate is all clients'
completion tokens over the wall time from the first request to the last reply's end.

llama-cpp-python's server runs one request at a time (its requests wait on one lock); it is started with
``--interrupt_requests False``, without which a new request cuts off the stream in progress.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

QUESTIONS = ["Explain what a hash map is.", "Write a haiku about the sea.", "Describe how a bicycle works.",
             "What is recursion?", "Tell me about the planet Mars.", "How do vaccines work?",
             "Explain TCP in simple terms.", "What is a prime number?", "Describe the water cycle.",
             "What does a compiler do?", "Explain photosynthesis.", "What is machine learning?",
             "Describe a sorting algorithm.", "What is the speed of light?", "How does a CPU cache work?",
             "Explain what an API is."]
#: Qwen2.5's end-of-text tokens, banned so that every reply runs to max_tokens
NO_END = {"151643": -100, "151645": -100}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                            "amx_tile", "amx_int8") if f in flags]
        return f"{name}, {os.cpu_count()} cores ({' '.join(simd)})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def start_server(engine: str, model: str, port: int, threads: int, parallel: int, n_ctx_slot: int):
    if engine == "ours":
        cmd = [sys.executable, "-m", "ggml_backend", "serve", "-m", model, "--port", str(port), "-t", str(threads),
               "-np", str(parallel), "-c", str(n_ctx_slot * parallel)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port), "--host", "127.0.0.1",
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx_slot),
               "--interrupt_requests", "False", "--model_alias", "bench"]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    log = tempfile.TemporaryFile()   # not a pipe: llama.cpp's log would fill it and block the server
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{engine} server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"{engine} server did not start in 300 s")


async def one_client(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logit_bias": NO_END}
    t0 = time.perf_counter()
    first, n_deltas = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                n_deltas += 1
                if first is None:
                    first = time.perf_counter() - t0
    return first, n_deltas, time.perf_counter() - t0


async def level(url: str, model: str, n_clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_client(client, url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens)
                                         for i in range(n_clients)])
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {"clients": n_clients, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "aggregate_tok_s": n_clients * max_tokens / wall, "wall_s": wall,
            "deltas_per_reply": statistics.median(r[1] for r in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--parallel", type=int, default=4, help="our slots (-np)")
    ap.add_argument("--ctx-per-request", type=int, default=1024)
    ap.add_argument("--engines", default="ours,llama-cpp-python")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.model is None:
        from ggml_backend.default_model import default_model_path
        args.model = default_model_path(progress=False)
    levels = [int(x) for x in args.clients.split(",")]
    report = {"cpu": cpu_name(), "model": os.path.basename(args.model), "threads": args.threads,
              "max_tokens": args.max_tokens, "parallel": args.parallel, "load_before": os.getloadavg(),
              "engines": {}}
    print(f"CPU: {report['cpu']}; model {report['model']}; {args.threads} threads; {args.max_tokens} tokens per "
          f"reply; our slots: {args.parallel}")
    for engine in args.engines.split(","):
        try:
            import importlib
            if engine != "ours":
                importlib.import_module("llama_cpp.server.app")
        except ImportError as exc:
            print(f"{engine}: not installed ({exc}); pip install 'llama-cpp-python[server]'")
            continue
        process, url = start_server(engine, args.model, free_port(), args.threads, args.parallel,
                                    args.ctx_per_request)
        try:
            model = "bench" if engine != "ours" else os.path.basename(args.model).rsplit(".", 1)[0]
            asyncio.run(level(url, model, 1, 4))   # warm-up (our kernels compile on first use)
            rows = []
            for n in levels:
                row = asyncio.run(level(url, model, n, args.max_tokens))
                rows.append(row)
                print(f"{engine:>17}  clients {n:2d}  TTFT p50 {row['ttft_p50_s']:6.2f} s  p95 "
                      f"{row['ttft_p95_s']:6.2f} s  aggregate {row['aggregate_tok_s']:6.1f} tok/s  "
                      f"(wall {row['wall_s']:.1f} s)", flush=True)
            report["engines"][engine] = rows
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    report["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
