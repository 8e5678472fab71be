#!/usr/bin/env python3
"""Scale-out benchmark: ``ggml-backend batch`` throughput in one process and on 1 and 2 Ray Data actors, and
requests/s of ``ggml-backend serve`` (one process) beside ``serve --ray`` with 1 and 2 replicas, on the same model.

usage: python benchmarks/bench_ray.py [-m MODEL] [--lines 8] [--max-tokens 32] [--requests 16] [--clients 4]
                                      [--repeat 1] [--skip batch|serve] [--json OUT]

Procedure. A local Ray cluster with as many CPUs as the machine's cores is started first (its start-up time is
printed, not counted). Every configuration uses all the cores: one process with -t CORES; N actors or replicas
with CORES / N threads each.

* batch: ``--lines`` chat lines (a different short question each, temperature 0, ``--max-tokens`` tokens, end of
  text banned through ``logit_bias`` so every reply has the same length); the time is the whole ``run_local`` /
  ``run_ray`` call, loading the model(s) included; tokens/s = completion tokens / that time.
* serve: ``--clients`` clients at once, ``--requests`` non-streaming chat requests in all (same questions, 16
  tokens each, end of text banned), after one warm-up request per slot; requests/s = requests / wall time from
  the first request to the last reply. The one-process server runs in its own process (``python -m ggml_backend
  serve``, -np 2); each Ray replica has 2 slots too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_server import NO_END, QUESTIONS, cpu_name  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_lines(n: int, max_tokens: int) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
             "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_END} for i in range(n)]


def bench_batch(model: str, args, cores: int) -> list[dict]:
    from ggml_backend.batch import run_local
    from ggml_backend.batch_ray import run_ray
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.jsonl")
        with open(src, "w") as f:
            for line in batch_lines(args.lines, args.max_tokens):
                f.write(json.dumps(line) + "\n")
        configs = [("one process", None, cores), ("Ray, 1 actor", 1, cores), ("Ray, 2 actors", 2, max(1, cores // 2))]
        for repeat in range(args.repeat):
            for name, workers, threads in configs:
                out = os.path.join(tmp, f"out-{repeat}-{workers}.jsonl")
                common = dict(model_path=model, n_ctx=1024, n_threads=threads, progress=False)
                summary = (run_local(src, out, **common) if workers is None
                           else run_ray(src, out, workers=workers, **common))
                assert summary.errors == 0 and summary.written == args.lines, summary
                rows.append({"config": name, "threads_each": threads, "seconds": round(summary.seconds, 2),
                             "tokens": summary.tokens, "tok_s": round(summary.tokens / summary.seconds, 2)})
                print(f"batch  {name:16s} {threads} thread(s) each: {summary.seconds:6.1f} s, "
                      f"{rows[-1]['tok_s']:5.1f} tok/s", file=sys.stderr)
    return rows


async def load(base: str, n_requests: int, clients: int) -> tuple[float, int]:
    """(seconds, completion tokens) of n_requests chat requests sent by `clients` clients at once."""
    queue = list(range(n_requests))
    tokens = 0

    async def client(http):
        nonlocal tokens
        while queue:
            i = queue.pop()
            body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": 16,
                    "temperature": 0, "logit_bias": NO_END}
            r = await http.post(f"{base}/v1/chat/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
    async with httpx.AsyncClient(timeout=600) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.monotonic() - started, tokens


def wait_health(base: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not come up")


def measure_serve(name: str, base: str, args, threads: int, warmups: int) -> dict:
    asyncio.run(load(base, warmups, warmups))
    seconds, tokens = asyncio.run(load(base, args.requests, args.clients))
    row = {"config": name, "threads_each": threads, "requests": args.requests, "clients": args.clients,
           "seconds": round(seconds, 2), "req_s": round(args.requests / seconds, 3), "tok_s": round(tokens / seconds, 2)}
    print(f"serve  {name:16s} {threads} thread(s) each: {row['req_s']:.2f} req/s, {row['tok_s']:.1f} tok/s",
          file=sys.stderr)
    return row


def bench_serve(model: str, args, cores: int) -> list[dict]:
    from ray import serve

    from ggml_backend.server import ModelConfig, ServerConfig
    from ggml_backend.server.ray_serve import APP_NAME, application
    rows = []
    for _ in range(args.repeat):
        port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        server = subprocess.Popen([sys.executable, "-m", "ggml_backend", "serve", "-m", model, "-t", str(cores),
                                   "-np", "2", "-c", "2048", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_health(f"http://127.0.0.1:{port}")
            rows.append(measure_serve("one process", f"http://127.0.0.1:{port}", args, cores, 2))
        finally:
            server.terminate()
            server.wait(30)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            for replicas in (1, 2):
                threads = max(1, cores // replicas)
                config = ServerConfig(models=[ModelConfig(alias="m", path=model, n_ctx=2048, n_parallel=2,
                                                          n_threads=threads)])
                serve.run(application(config, replicas=replicas, cpus_per_replica=threads), name=APP_NAME,
                          route_prefix="/")
                rows.append(measure_serve(f"Ray, {replicas} replica{'s' if replicas > 1 else ''}",
                                          f"http://127.0.0.1:{port}", args, threads, 2 * replicas))
                serve.delete(APP_NAME)
        finally:
            serve.shutdown()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None, help="model file (default: the default model)")
    parser.add_argument("--lines", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip", choices=["batch", "serve"], default=None)
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()
    import ray

    from ggml_backend.default_model import default_model_path
    model = os.path.abspath(args.model) if args.model else str(default_model_path())
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    started = time.monotonic()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.monotonic() - started:.1f} s; {cpu_name()}; load {load_before}", file=sys.stderr)
    try:
        result = {"cpu": cpu_name(), "model": os.path.basename(model), "load_before": load_before,
                  "batch": [] if args.skip == "batch" else bench_batch(model, args, cores),
                  "serve": [] if args.skip == "serve" else bench_serve(model, args, cores)}
    finally:
        ray.shutdown()
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
