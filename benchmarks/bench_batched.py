#!/usr/bin/env python3
"""Batched decoding, side by side in one run: llama.cpp's own batch API, our ``ContinuousBatcher`` in process, and
our server with N concurrent streaming clients; aggregate decode tokens/s at N = 1, 2, 4, 8, 16 sequences.

usage: python benchmarks/bench_batched.py [-m MODEL] [--n 1,2,4,8,16] [--prompt 32] [--steps 32] [--threads 2]
                                          [--engines llamacpp,ours,server] [--llamacpp-script PATH] [--repeat 3]
                                          [--json OUT]

Procedure, the same for the three (llama.cpp's is ``shared/bench/batched_llamacpp.py``, run as it is):
N sequences with random prompts of ``--prompt`` token ids (numpy default_rng(0), ids 100..2999, as that script
draws them), evaluated first and not timed; then ``--steps`` decode steps, each carrying one token of every
sequence (greedy), timed: aggregate decode tokens/s = N * steps / time.

* llamacpp: one ``llama_decode`` of N tokens per step, in one KV cache (its continuous batching mechanism).
* ours: ``ContinuousBatcher.step()`` (one forward pass for the N sequences, then N samplings).
* server: ``ggml-backend serve -np 16`` in its own process; N clients stream ``/v1/completions`` at once (the same
  token-id prompts, temperature 0, end tokens banned so each runs the full length). Its rate is measured over the
  window where all N are decoding (from the last client's first token to the first client's last token), and
  its time per step (N / rate) is compared with ours in process at the same N: the server's overhead per step.
  The rate is the sum of each client's own rate inside that window (``tok_s``); ``tok_s_shared_window``, all
  clients' tokens inside the window over its length, reads a few percent low when a step's chunks arrive as one
  burst (the window opens at the last stamp of a burst and closes at the first of another).

The three alternate at each N and the sweep repeats ``--repeat`` times; each figure is the median run. Ratios are
given two ways: between those medians, and paired (each sweep's server and in-process runs, or ours and llama.cpp's,
ran within the same minute: the median of the sweeps' ratios), which this VM's minute-to-minute swings disturb less.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ggml_backend._threading import environment_for_other_engines

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LLAMACPP_SCRIPT = REPO.parent / "shared" / "bench" / "batched_llamacpp.py"
#: decode steps a sequence may take before the timed ones (its prompt went in before others'): max_tokens leaves it
HEADROOM = 32


def no_end_bias(model: str) -> dict:
    """logit_bias banning the model's end-of-generation tokens, so every stream runs its full length."""
    from ggml_backend import Llama
    with Llama(model, n_ctx=64, verbose=False) as llm:
        return {str(t): -100 for t in llm.tokenizer.eog_ids}


def prompts(n: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)   # batched_llamacpp.py's draws
    return [[int(x) for x in rng.integers(100, 3000, length)] for _ in range(n)]


def run_llamacpp(script: Path, model: str, ns, threads: int, prompt: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, str(script), model, "--threads", str(threads), "--n",
                          ",".join(map(str, ns)), "--prompt", str(prompt), "--steps", str(steps)],
                         capture_output=True, text=True, timeout=3600,
                         # the user's environment, not ours: importing ggml_backend sets OMP_WAIT_POLICY=PASSIVE
                         # for numba's OpenMP, which would slow llama.cpp's OpenMP decode by a third
                         env=environment_for_other_engines())
    if out.returncode:
        raise RuntimeError(f"{script} failed: {out.stderr[-2000:]}")
    return {int(n): float(v) for n, v in re.findall(r"n=(\d+):([\d.]+)tok/s", out.stdout)}


class Ours:
    """Our ContinuousBatcher in this process, the model loaded once."""

    def __init__(self, model: str, threads: int, prompt: int, steps: int):
        from ggml_backend import Llama
        self.llm = Llama(model, n_ctx=prompt + steps + HEADROOM + 8, n_threads=threads, verbose=False)
        self.prompt, self.steps = prompt, steps
        self.measure(1)   # warm-up: numba loads its kernels

    def measure(self, n: int) -> dict:
        """The rate of ``steps`` steps in which every one of the n sequences decodes. Sequences whose prompts
        went in first have a few tokens more when the timing starts, so max_tokens leaves them HEADROOM: none
        ends inside the window (counting n tokens per step when some had ended overstated the rate by up to a
        fifth at N = 16)."""
        from ggml_backend import ContinuousBatcher
        batcher = ContinuousBatcher(self.llm, max_sequences=n)
        for p in prompts(n, self.prompt):
            batcher.add(p, max_tokens=self.steps + HEADROOM, temperature=0, repeat_penalty=1.0, stop_tokens=[])
        while not all(s.generated for s in batcher.sequences.values()):   # prompts in, first tokens out
            batcher.step()
        tokens = 0
        t0 = time.perf_counter()
        for _ in range(self.steps):
            tokens += sum(e.token is not None for e in batcher.step())
        dt = time.perf_counter() - t0
        if tokens != n * self.steps:
            raise RuntimeError(f"{tokens} tokens in {self.steps} steps of {n} sequences: some ended early")
        for seq_id in list(batcher.sequences):
            batcher.cancel(seq_id)
        return {"tok_s": tokens / dt, "step_ms": 1000 * dt / self.steps}


def start_server(model: str, threads: int, parallel: int, n_ctx_slot: int):
    import httpx
    from bench_server import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "ggml_backend", "serve", "-m", model, "--port", str(port), "-t", str(threads),
           "-np", str(parallel), "-c", str(n_ctx_slot * parallel), "--alias", "bench"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not start in 300 s")


async def _client(client, url: str, tokens: list[int], max_tokens: int, no_end: dict) -> list[float]:
    body = {"model": "bench", "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": no_end, "repeat_penalty": 1.0}
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    return stamps


async def _level(url: str, n: int, prompt: int, steps: int, no_end: dict) -> dict:
    import httpx
    async with httpx.AsyncClient(timeout=600) as client:
        streams = await asyncio.gather(*[_client(client, url, p, steps + 1, no_end) for p in prompts(n, prompt)])
    start = max(s[0] for s in streams)    # every client is decoding from here ...
    end = min(s[-1] for s in streams)     # ... to here
    # each client's own rate inside that window, summed: a step's chunks reach the clients as a burst (the server
    # hands them over together), and the first client of a burst is stamped a few ms before the last, so counting
    # every client's tokens between the window's ends (a late stamp, then an early one) missed most of a burst:
    # 15 tokens of 500 at N = 16, 3% of the rate. Each client's own first and last stamps sit at the same place in
    # their bursts
    rate = 0.0
    for s in streams:
        inside = [t for t in s if start <= t <= end]
        if len(inside) >= 2:
            rate += (len(inside) - 1) / (inside[-1] - inside[0])
    in_window = sum(1 for s in streams for t in s if start < t <= end)
    return {"tok_s": rate, "step_ms": 1000 * n / rate, "tok_s_shared_window": in_window / (end - start),
            "chunks_per_stream": float(np.median([len(s) for s in streams]))}


def median_row(rows: list[dict]) -> dict:
    """The run whose rate is the median (its other fields with it), plus every run's rate."""
    ordered = sorted(rows, key=lambda r: r["tok_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_tok_s": [round(r["tok_s"], 2) for r in rows]}


def paired_ratios(runs: dict, ns: list[int]) -> dict:
    """Per N: ours / llama.cpp tok/s and the server's overhead per step against ours in process, each the median of
    the sweeps' own ratios (the engines of one sweep ran back to back), with every sweep's ratio."""
    paired = {}
    for n in ns:
        entry = {}
        for name, a, b, of, less in (("ours_over_llamacpp", "ours", "llamacpp", "tok_s", 0),
                                     ("server_overhead", "server", "ours", "step_ms", 1)):
            if a in runs and b in runs and runs[a][n] and runs[b][n]:
                ratios = [x[of] / y[of] - less for x, y in zip(runs[a][n], runs[b][n])]
                entry[name] = float(np.median(ratios))
                entry[name + "_runs"] = [round(r, 4) for r in ratios]
        paired[n] = entry
    return paired


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--n", default="1,2,4,8,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="llamacpp,ours,server")
    ap.add_argument("--llamacpp-script", default=str(DEFAULT_LLAMACPP_SCRIPT))
    ap.add_argument("--repeat", type=int, default=3, help="sweeps; each figure is the median run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.model is None:
        from ggml_backend.default_model import default_model_path
        args.model = default_model_path(progress=False)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - {"llamacpp", "ours", "server"})
    if unknown or not engines:
        ap.error(f"--engines: {', '.join(unknown) or 'none given'}: choose from llamacpp, ours, server")
    ns = [int(x) for x in args.n.split(",")]
    from bench_server import cpu_name
    report = {"cpu": cpu_name(), "model": os.path.basename(args.model), "threads": args.threads,
              "prompt": args.prompt, "steps": args.steps, "load_before": os.getloadavg(), "results": {}}
    print(f"CPU: {report['cpu']}; model {report['model']}; {args.threads} threads; prompts of {args.prompt} tokens, "
          f"{args.steps} decode steps; load {report['load_before'][0]:.2f}", flush=True)
    # the three engines alternate at each N, and the whole sweep repeats: this machine's neighbours move a figure
    # by tens of percent from one minute to the next, so each engine must see the same conditions
    script = Path(args.llamacpp_script)
    if "llamacpp" in engines and not script.is_file():
        print(f"llamacpp: {script} not found (--llamacpp-script)")
        engines.remove("llamacpp")
    ours = Ours(args.model, args.threads, args.prompt, args.steps) if "ours" in engines else None
    no_end = no_end_bias(args.model) if "server" in engines else {}
    server = start_server(args.model, args.threads, max(ns), args.prompt + args.steps + 8) \
        if "server" in engines else None
    runs: dict = {engine: {n: [] for n in ns} for engine in engines}
    try:
        if server is not None:
            asyncio.run(_level(server[1], 2, args.prompt, 4, no_end))   # warm-up
        for rep in range(args.repeat):
            for n in ns:
                if "llamacpp" in engines:
                    rate = run_llamacpp(script, args.model, [n], args.threads, args.prompt, args.steps)[n]
                    runs["llamacpp"][n].append({"tok_s": rate, "step_ms": 1000 * n / rate})
                if ours is not None:
                    runs["ours"][n].append(ours.measure(n))
                if server is not None:
                    runs["server"][n].append(asyncio.run(_level(server[1], n, args.prompt, args.steps, no_end)))
                print(f"run {rep + 1} N={n}: " + ", ".join(f"{e} {runs[e][n][-1]['tok_s']:.1f}" for e in engines)
                      + f" tok/s (load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        if server is not None:
            server[0].terminate()
            try:
                server[0].wait(30)
            except subprocess.TimeoutExpired:
                server[0].kill()
    report["results"] = {e: {n: median_row(rows) for n, rows in by_n.items()} for e, by_n in runs.items()}
    report["paired"] = paired_ratios(runs, ns)
    report["load_after"] = os.getloadavg()
    res = report["results"]
    print(f"{'N':>3} {'llama.cpp tok/s':>16} {'ours tok/s':>11} {'server tok/s':>13} {'ours ms/step':>13} "
          f"{'server ms/step':>15} {'server overhead':>16}")
    for n in ns:
        lc = res.get("llamacpp", {}).get(n)
        lc = lc and lc["tok_s"]
        ours = res.get("ours", {}).get(n)
        server = res.get("server", {}).get(n)
        overhead = (server["step_ms"] / ours["step_ms"] - 1) if ours and server else None
        if overhead is not None:
            server["overhead_vs_in_process"] = overhead
        cell = lambda v, f: f"{v:{f}}" if v is not None else "-"  # noqa: E731
        print(f"{n:>3} {cell(lc, '16.1f')} {cell(ours and ours['tok_s'], '11.1f')} "
              f"{cell(server and server['tok_s'], '13.1f')} {cell(ours and ours['step_ms'], '13.1f')} "
              f"{cell(server and server['step_ms'], '15.1f')} "
              f"{cell(None if overhead is None else 100 * overhead, '15.1f')}%")
    for n, pair in report["paired"].items():
        print(f"{n:>3} paired, median of the sweeps' ratios: "
              + ", ".join(f"{name} {100 * value:.1f}%" if name == "server_overhead" else f"{name} {value:.2f}"
                          for name, value in pair.items() if not name.endswith("_runs")))
    print(f"load after: {report['load_after'][0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
