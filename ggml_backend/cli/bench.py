"""``ggml-backend bench``: speed figures of ggml_backend beside llama.cpp's (llama-cpp-python, when importable).

Each figure comes from a fresh process, with the procedure of shared/bench (open; a 256-token prompt of seeded
random ids; 64 greedy decode steps one token at a time; peak RSS), so the two engines' numbers can be divided.
"""
from __future__ import annotations

import json
import subprocess
import sys

# One measurement, run in a fresh interpreter: prints one JSON line.
_WORKER = r'''
import json, resource, sys, time
engine, model, threads, n_prompt, n_gen, n_ctx, pos = sys.argv[1:8]
threads, n_prompt, n_gen, n_ctx, pos = int(threads), int(n_prompt), int(n_gen), int(n_ctx), int(pos)
t_start = time.perf_counter()
import numpy as np
if engine == "llama.cpp":
    import llama_cpp
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, n_batch=512)
else:
    from ggml_backend import Llama
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, verbose=False, n_batch=512)
t_open = time.perf_counter() - t_start
rng = np.random.default_rng(0)
prompt = [int(x) for x in rng.integers(100, 3000, n_prompt)]
llm.reset()
t = time.perf_counter(); llm.eval(prompt[:1]); t_first = time.perf_counter() - t_start
llm.reset()
t = time.perf_counter(); llm.eval(prompt); t_pp = time.perf_counter() - t
tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
t = time.perf_counter()
for _ in range(n_gen):
    llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
t_tg = time.perf_counter() - t
result = {"engine": engine, "open_s": t_open, "first_token_s": t_first, "prefill_tok_s": n_prompt / t_pp,
          "decode_tok_s": n_gen / t_tg}
if pos > 0:
    # decode speed deep in the context: fill up to pos with more random tokens, then time n_gen steps
    fill = [int(x) for x in rng.integers(100, 3000, pos - llm.n_tokens)]
    llm.eval(fill)
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    result["decode_deep_tok_s"] = n_gen / (time.perf_counter() - t)
    result["deep_position"] = pos
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(result))
'''


def add_arguments(parser) -> None:
    parser.add_argument("-m", "--model", default=None, help="GGUF/GGML file (default: the embedded default model)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048)
    parser.add_argument("--deep-position", type=int, default=0,
                        help="also time decoding after filling the context to this position (e.g. 1900)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per engine; medians are reported")
    parser.add_argument("--engines", default="ggml_backend,llama.cpp")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def measure(engine: str, model: str, args) -> dict:
    cmd = [sys.executable, "-c", _WORKER, engine, model, str(args.threads), str(args.prompt_tokens),
           str(args.gen), str(args.ctx_size), str(args.deep_position)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{engine} benchmark failed:\n{proc.stderr[-2000:]}")


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def run(args) -> int:
    import importlib.util
    model = args.model
    if model is None:
        from ..default_model import default_model_path
        model = str(default_model_path())
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: llama.cpp's figures are left out "
              "(pip install llama-cpp-python builds it from source)", file=sys.stderr)
        engines.remove("llama.cpp")
    figures = {}
    for engine in engines:
        runs = [measure(engine, model, args) for _ in range(args.repeat)]
        figures[engine] = {key: _median([r[key] for r in runs]) for key in runs[0] if key != "engine"}
    if args.json:
        print(json.dumps({"model": model, "threads": args.threads, "figures": figures}, indent=2))
        return 0
    keys = ["open_s", "first_token_s", "prefill_tok_s", "decode_tok_s", "decode_deep_tok_s", "peak_rss_mb"]
    print(f"model: {model}\nthreads: {args.threads}, prompt: {args.prompt_tokens} tokens, decode: {args.gen} tokens")
    header = f"{'figure':<20}" + "".join(f"{e:>16}" for e in engines)
    if len(engines) == 2:
        header += f"{'ratio':>10}"
    print(header)
    for key in keys:
        if not all(key in figures[e] for e in engines):
            continue
        row = f"{key:<20}" + "".join(f"{figures[e][key]:>16.2f}" for e in engines)
        if len(engines) == 2:
            a, b = figures[engines[0]][key], figures[engines[1]][key]
            row += f"{a / b:>10.2f}" if b else ""
        print(row)
    return 0
