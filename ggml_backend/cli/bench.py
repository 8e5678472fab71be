"""``ggml-backend bench``: speed figures of ggml_backend beside llama.cpp's (llama-cpp-python, when importable).

Every figure comes from its own fresh process, with the procedure of shared/bench: open the file with n_ctx 2048
and n_batch 512; warm up (one token, an 8-token batch, then one of ``session.prompt_kernels_from()`` tokens, 48, so
that both engines have touched every weight and loaded their kernels, the prompt kernels included: on an empty
compile cache the first timed prompt measured the compiler); then time one thing: a prompt of seeded random ids (256
and 1024 tokens), or greedy decoding one token at a time after filling the context to a position (the prompt
length, 50, 1900). With ``-t`` above 1 the decode after the prompt runs again on one thread, right after, and the
report gives what the threads gain (``decode_N_threads_over_1``), beside the kernel table's own N-thread column
(bench_kernels.py: memory read and each kernel on N threads against one: what the machine lets them gain). "First
token" is the wall time from starting a fresh interpreter to the logits of one token (numba's compile cache
warm). Peak RSS is the largest high-water RSS (VmHWM) of the run's processes; its cap is file
size + KV cache + 150 MB, the KV cache as each engine allocates it (float16 in both, their default). A process that
crashes or fails is reported as such in its figure's place; the other figures still run. ``--repeat N`` reports
medians.

``--paired`` adds figures of both engines in one process, taking turns in short blocks (bench_paired.py): on a
machine whose memory bandwidth moves with its neighbours, the ratio of two engines measured within a second of each
other, the median of several rounds.

``--scaling`` adds two tables: prompt and decode speed against model size (the real 0.5B and synthetic 1B- and
7B-shaped Llamas in q4_0 and q8_0, written once into a cache directory, see bench_models.py), and decode speed
against the context position.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# One measurement, run in a fresh interpreter: prints one line "RESULT {json}".
_WORKER = r'''
import json, sys, time
def peak_rss():
    # VmHWM, not ru_maxrss: a child started by vfork/exec inherits its parent's ru_maxrss
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
engine, model, threads, n_ctx, task, a, b, warm_prompt = sys.argv[1:9]
threads, n_ctx, a, b, warm_prompt = int(threads), int(n_ctx), int(a), int(b), int(warm_prompt)
t_start = time.perf_counter()
import numpy as np
if engine == "llama.cpp":
    import llama_cpp
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, n_batch=512)
    kv_bytes = None
    def last_logits():
        # llama-cpp-python 0.3 fills llm.scores only with logits_all; the context holds the last token's logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
else:
    from ggml_backend import Llama
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, verbose=False, n_batch=512)
    kv_bytes = llm.cache.max_nbytes   # the cache grows as it fills: its size at n_ctx
    def last_logits():
        # the session's own array, as llama.cpp's side reads its context's: ``scores`` builds an n_ctx x n_vocab
        # array on each access (0.4-0.7 ms a token, page faults included, for Qwen2.5-0.5B at n_ctx 2048)
        return llm.session.last_logits
result = {"open_s": time.perf_counter() - t_start}
if kv_bytes is not None:
    result["kv_cache_bytes"] = kv_bytes
n_vocab = llm.n_vocab()
rng = np.random.default_rng(0)
def random_ids(n):
    return [int(x) for x in rng.integers(min(100, n_vocab // 4), min(3000, n_vocab), n)]
def greedy():
    return int(np.argmax(last_logits()))
if task == "first":
    llm.eval(random_ids(1))
    result["first_token_in_process_s"] = time.perf_counter() - t_start
    result["finite"] = bool(np.isfinite(last_logits()).all())
else:
    # warm-up, not timed: a token, a few-token batch, and the shortest batch that ggml_backend's prompt kernels
    # take, so that neither engine's timed prompt pays for loading or compiling kernels
    llm.eval(random_ids(1)); llm.eval(random_ids(8)); llm.reset(); llm.eval(random_ids(warm_prompt)); llm.reset()
    if task == "prompt":
        prompt = random_ids(a)
        t = time.perf_counter(); llm.eval(prompt); elapsed = time.perf_counter() - t
        result.update(prompt_tokens=a, prompt_tok_s=a / elapsed)
    elif task == "decode":
        position, n_gen = a, b
        llm.eval(random_ids(position))
        tok = greedy()
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok]); tok = greedy()
        result.update(position=position, gen_tokens=n_gen, decode_tok_s=n_gen / (time.perf_counter() - t))
    else:
        raise SystemExit(f"unknown task {task}")
result["peak_rss_mb"] = peak_rss() / 2 ** 20
print("RESULT " + json.dumps(result), flush=True)
'''

ENGINES = ("ggml_backend", "llama.cpp")
OVERHEAD_MB = 150
MB = 1024 * 1024


def add_arguments(parser) -> None:
    parser.add_argument("-m", "--model", default=None, help="GGUF/GGML file (default: the embedded default model)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of the first prompt figure, "
                        "and the position the plain decode figure starts from")
    parser.add_argument("--long-prompt-tokens", type=int, default=1024, help="prompt length of the second one")
    parser.add_argument("--gen", type=int, default=64, help="decode steps timed per decode figure")
    parser.add_argument("--near-position", type=int, default=50, help="decode speed near the start of the context")
    parser.add_argument("--deep-position", type=int, default=1900,
                        help="decode speed deep in the context (0: leave out)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each figure; medians are reported")
    parser.add_argument("--engines", default="ggml_backend,llama.cpp")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one measuring process may take")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the figures as Markdown tables")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="measure nothing: print the report saved by an earlier --json run")
    parser.add_argument("--scaling", action="store_true",
                        help="also tables of speed against model size and against context position")
    parser.add_argument("--scaling-models", default="0.5b,1b-q4_0,1b-q8_0,7b-q4_0,7b-q8_0",
                        help="models of the size table: 0.5b (the -m model), SHAPE-TYPE synthetic ones (shapes "
                             "tiny, 1b, 7b, 13b; types q4_0, q8_0, q3_K) or file paths")
    parser.add_argument("--positions", default="50,512,1024,1900", help="positions of the context table")
    parser.add_argument("--bench-dir", default=None,
                        help="where synthetic models are written and reused (default ~/.cache/ggml_backend/bench "
                             "or $GGML_BACKEND_BENCH_DIR)")
    parser.add_argument("--paired", action="store_true",
                        help="also both engines in one process taking turns (decode in blocks of steps, prompts one "
                             "each, the order swapped every round): the median ratio of the rounds")
    parser.add_argument("--paired-rounds", type=int, default=12, help="rounds of each paired decode figure")
    parser.add_argument("--paired-prompt-rounds", type=int, default=5, help="rounds of each paired prompt figure")
    parser.add_argument("--skip-basic", action="store_true",
                        help="with --scaling or --paired: only those tables")
    parser.add_argument("--no-kernels", action="store_true",
                        help="leave out the per-core kernel table (memory read bandwidth, each type's GB/s)")


# ------------------------------------------------------------------------------------------- one measurement

def run_worker(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one measuring process; its RESULT, or {"error": ...} when it crashed, failed or ran out of time.
    ``wall_s``: from starting the process to reading its RESULT line (the process's exit is not counted)."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        result = None
        try:
            for line in proc.stdout:
                if line.startswith("RESULT ") and result is None:
                    wall = time.perf_counter() - t0
                    result = json.loads(line[7:])
                    result["wall_s"] = wall
            proc.wait()
        finally:
            watchdog.cancel()
        if result is not None:
            return result
        if time.perf_counter() - t0 >= timeout:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode < 0:
            return {"error": f"crashed (signal {-proc.returncode})"}
        stderr.seek(0)
        last = [line for line in stderr.read().strip().splitlines() if line.strip()]
        return {"error": f"failed (exit {proc.returncode}): {last[-1][:200] if last else 'no output'}"}


def measure(engine: str, model: str, task: str, a: int = 0, b: int = 0, *, threads: int = 2, n_ctx: int = 2048,
            timeout: float = 1800) -> dict:
    from ..model.session import prompt_kernels_from     # the warm-up's last batch: the prompt kernels' shortest
    cmd = [sys.executable, "-c", _WORKER, engine, str(model), str(threads), str(n_ctx), task, str(a), str(b),
           str(prompt_kernels_from())]
    # each engine's process gets the user's environment: not the OMP_WAIT_POLICY=PASSIVE that importing
    # ggml_backend adds here, which made llama.cpp's OpenMP threads sleep between kernels (decode -35%)
    from .._threading import environment_for_other_engines
    from ..compile_helpers import ENV as COMPILE_HELPERS
    env = environment_for_other_engines()
    env[COMPILE_HELPERS] = "0"      # no compile helper process (compile_helpers.py) beside a measurement
    result = run_worker(cmd, timeout, env=env)
    if task == "first" and "error" not in result:
        # the worker prints its RESULT right after the first token's logits
        result["first_token_s"] = result["wall_s"]
    return result


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _combine(runs: list[dict], key: str):
    """The median of ``key`` over the runs that have it, else the first run's error."""
    values = [r[key] for r in runs if key in r]
    if values:
        return _median(values)
    errors = [r["error"] for r in runs if "error" in r]
    return {"error": errors[0] if errors else f"no {key}"}


# ------------------------------------------------------------------------------------------- the model's sizes

def model_facts(model: str, n_ctx: int) -> dict:
    """File size and the two engines' KV cache bytes for n_ctx: float16 K and V in both (their default),
    n_layer * n_ctx * (n_embd_k_gqa + n_embd_v_gqa) * 2 bytes."""
    from ..formats import load
    from ..model.spec import resolve_hparams
    model_file = load(model)
    hp = resolve_hparams(model_file.metadata, {n: tuple(t.shape) for n, t in model_file.tensors.items()})
    elements = hp.n_layer * n_ctx * (hp.n_embd_k_gqa + hp.n_embd_v_gqa)
    return {"file_bytes": os.path.getsize(model), "n_layer": hp.n_layer, "n_embd": hp.n_embd,
            "n_embd_k_gqa": hp.n_embd_k_gqa, "n_embd_v_gqa": hp.n_embd_v_gqa, "n_vocab": hp.n_vocab,
            "kv_cache_bytes": {"llama.cpp": elements * 2, "ggml_backend": elements * 2}}


def rss_cap_mb(facts: dict, engine: str, kv_bytes: int | None = None) -> float:
    kv = kv_bytes if kv_bytes is not None else facts["kv_cache_bytes"][engine]
    return (facts["file_bytes"] + kv) / MB + OVERHEAD_MB


# ------------------------------------------------------------------------------------------- machine

def machine_description() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                                             "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
                break
    except OSError:
        pass
    return info


def kernel_figures(timeout: float, threads: int = 1) -> dict:
    """The per-core kernel table (bench_kernels.py), from a fresh process, with its ``threads``-thread scaling
    where ``threads`` > 1: {"error": ...} if it fails."""
    result = subprocess.run([sys.executable, "-m", "ggml_backend.cli.bench_kernels", "--json", "--threads",
                             str(threads)], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------- the basic figures

def basic_figures(engine: str, model: str, args) -> dict:
    """Every figure of one engine: medians over args.repeat runs, each figure a fresh process."""
    tasks = {"first": ("first", 0, 0),
             "prompt": ("prompt", args.prompt_tokens, 0),
             "prompt_long": ("prompt", args.long_prompt_tokens, 0),
             "decode": ("decode", args.prompt_tokens, args.gen)}
    if args.threads > 1:     # the same decode on one thread, right after it: what the threads gain
        tasks["decode_one_thread"] = ("decode", args.prompt_tokens, args.gen)
    tasks["decode_near"] = ("decode", args.near_position, args.gen)
    if args.deep_position:
        tasks["decode_deep"] = ("decode", args.deep_position, args.gen)
    runs = {name: [] for name in tasks}
    peaks = []
    for _ in range(args.repeat):
        peak = 0.0
        for name, (task, a, b) in tasks.items():
            threads = 1 if name == "decode_one_thread" else args.threads
            result = measure(engine, model, task, a, b, threads=threads, n_ctx=args.ctx_size, timeout=args.timeout)
            runs[name].append(result)
            peak = max(peak, result.get("peak_rss_mb", 0.0))
        if peak:
            peaks.append(peak)
    figures = {
        "open_s": _combine(runs["first"], "open_s"),
        "first_token_s": _combine(runs["first"], "first_token_s"),
        f"prompt_{args.prompt_tokens}_tok_s": _combine(runs["prompt"], "prompt_tok_s"),
        f"prompt_{args.long_prompt_tokens}_tok_s": _combine(runs["prompt_long"], "prompt_tok_s"),
        "decode_tok_s": _combine(runs["decode"], "decode_tok_s"),
    }
    if args.threads > 1:
        one = _combine(runs["decode_one_thread"], "decode_tok_s")
        figures["decode_1_thread_tok_s"] = one
        figures[f"decode_{args.threads}_threads_over_1"] = (figures["decode_tok_s"] / one if _is_number(one) and
                                                            _is_number(figures["decode_tok_s"]) else
                                                            {"error": "missing decode figure"})
    figures[f"decode_at_{args.near_position}_tok_s"] = _combine(runs["decode_near"], "decode_tok_s")
    if args.deep_position:
        deep = _combine(runs["decode_deep"], "decode_tok_s")
        near = figures[f"decode_at_{args.near_position}_tok_s"]
        figures[f"decode_at_{args.deep_position}_tok_s"] = deep
        figures["deep_over_near"] = deep / near if _is_number(deep) and _is_number(near) else \
            {"error": "missing decode figure"}
    figures["peak_rss_mb"] = _median(peaks) if peaks else _combine(runs["first"], "peak_rss_mb")
    kv = [r["kv_cache_bytes"] for rs in runs.values() for r in rs if "kv_cache_bytes" in r]
    if kv:
        figures["kv_cache_mb"] = kv[0] / MB      # as the engine allocated it
    return figures


def _is_number(value) -> bool:
    return isinstance(value, (int, float))


def _engines(spec: str) -> list[str]:
    import importlib.util
    engines = [e.strip() for e in spec.split(",") if e.strip()]
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: llama.cpp's figures are left out "
              "(pip install llama-cpp-python builds it from source)", file=sys.stderr)
        engines.remove("llama.cpp")
    return engines


def _validate(args) -> None:
    for name in ("threads", "ctx_size", "prompt_tokens", "long_prompt_tokens", "gen", "near_position", "repeat",
                 "paired_rounds", "paired_prompt_rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.deep_position < 0:
        raise ValueError("--deep-position must not be negative")
    longest = max(args.long_prompt_tokens, args.prompt_tokens + args.gen, args.near_position + args.gen,
                  args.deep_position + args.gen)
    if longest > args.ctx_size:
        raise ValueError(f"the figures need {longest} positions but the context holds {args.ctx_size} (-c)")
    if args.paired:
        from .bench_paired import DECODE_BLOCK
        steps = args.paired_rounds * DECODE_BLOCK
        if args.prompt_tokens + steps > args.ctx_size:
            raise ValueError(f"--paired: {args.prompt_tokens} prompt tokens + {steps} decode steps per engine "
                             f"({args.paired_rounds} rounds of {DECODE_BLOCK}) do not fit the context "
                             f"{args.ctx_size} (-c)")
    if args.scaling:     # checked before anything is measured: a typo must not cost a long run's figures
        for spec in _list(args.scaling_models):
            _check_scaling_spec(spec)
        for position in _positions(args.positions):
            if position < 0 or position + args.gen > args.ctx_size:
                raise ValueError(f"--positions: {position} + {args.gen} decode steps do not fit the context "
                                 f"{args.ctx_size} (-c)")


def _list(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",") if item.strip()]


def _positions(spec: str) -> list[int]:
    try:
        return [int(item) for item in _list(spec)]
    except ValueError:
        raise ValueError(f"--positions: expected whole numbers separated by commas, got {spec!r}") from None


# ------------------------------------------------------------------------------------------- scaling

def _check_scaling_spec(spec: str) -> str:
    """What a --scaling-models entry names: "default" (0.5b: the -m model), "synthetic" (SHAPE-TYPE) or "file";
    ValueError for anything else."""
    from .bench_models import SHAPES, WEIGHT_TYPES
    if spec == "0.5b":
        return "default"
    shape, _, weight_type = spec.partition("-")
    if shape in SHAPES and weight_type in WEIGHT_TYPES:
        return "synthetic"
    if not Path(spec).is_file():
        raise ValueError(f"--scaling-models: {spec!r} is neither 0.5b, SHAPE-TYPE ({', '.join(SHAPES)} x "
                         f"{', '.join(WEIGHT_TYPES)}) nor a file")
    return "file"


def _scaling_model_path(spec: str, default_model: str, directory, progress: bool) -> str:
    from .bench_models import synthetic_model
    kind = _check_scaling_spec(spec)
    if kind == "default":
        return default_model
    if kind == "synthetic":
        shape, _, weight_type = spec.partition("-")
        return str(synthetic_model(shape, weight_type, directory, progress=progress))
    return spec


def scaling_tables(engines: list[str], model: str, args) -> dict:
    """Prompt and decode speed per model size (models over 2 GB: 8 decode steps; their prompt is the same
    --prompt-tokens long, the length the speed targets name: a 32-token one measured the few-token kernels, not
    prompt processing), and decode speed per position."""
    sizes = []
    for spec in _list(args.scaling_models):
        path = _scaling_model_path(spec, model, args.bench_dir, progress=not args.json)
        facts = model_facts(path, args.ctx_size)
        big = facts["file_bytes"] > 2 * 1024 ** 3
        n_prompt, n_gen = args.prompt_tokens, (8 if big else args.gen)
        row = {"model": spec, "path": path, "file_mb": facts["file_bytes"] / MB, "n_layer": facts["n_layer"],
               "n_embd": facts["n_embd"], "prompt_tokens": n_prompt, "gen_tokens": n_gen, "figures": {}}
        for engine in engines:
            prompt = [measure(engine, path, "prompt", n_prompt, threads=args.threads, n_ctx=args.ctx_size,
                              timeout=args.timeout) for _ in range(args.repeat)]
            decode = [measure(engine, path, "decode", n_prompt, n_gen, threads=args.threads, n_ctx=args.ctx_size,
                              timeout=args.timeout) for _ in range(args.repeat)]
            row["figures"][engine] = {"prompt_tok_s": _combine(prompt, "prompt_tok_s"),
                                      "decode_tok_s": _combine(decode, "decode_tok_s"),
                                      "peak_rss_mb": _combine(prompt + decode, "peak_rss_mb")}
        sizes.append(row)
        _progress(f"size table: {spec} done", args)
    positions = []
    for position in _positions(args.positions):
        row = {"position": position, "figures": {}}
        for engine in engines:
            runs = [measure(engine, model, "decode", position, args.gen, threads=args.threads, n_ctx=args.ctx_size,
                            timeout=args.timeout) for _ in range(args.repeat)]
            row["figures"][engine] = {"decode_tok_s": _combine(runs, "decode_tok_s")}
        positions.append(row)
        _progress(f"position table: {position} done", args)
    return {"sizes": sizes, "positions": positions}


def _progress(message: str, args) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- printing

def _cell(value, width: int) -> str:
    if isinstance(value, dict):
        text = value["error"] if len(value["error"]) < width - 1 else value["error"][:width - 4] + "..."
        return f"{text:>{width}}"
    return f"{value:>{width}.2f}"


def _ratio(engines: list[str], values: dict) -> str:
    if len(engines) == 2 and all(_is_number(values[e]) for e in engines) and values[engines[1]]:
        return f"{values[engines[0]] / values[engines[1]]:>16.2f}"
    return f"{'-':>16}" if len(engines) == 2 else ""


def print_report(report: dict) -> None:
    engines = report["engines"]
    cond = report["conditions"]
    machine = report["machine"]
    print(f"model: {report['model']} ({report['model_facts']['file_bytes'] / MB:.0f} MB)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {' '.join(machine['flags'])}; "
          f"load average {report['load_average_before']} -> {report['load_average_after']}; {report['date']}")
    print(f"threads {cond['threads']}, n_ctx {cond['n_ctx']}, decode {cond['gen']} tokens per figure, "
          f"median of {cond['repeat']} fresh-process runs")
    if report.get("figures"):
        figures = report["figures"]
        errors = [v["error"] for e in engines for v in figures[e].values() if isinstance(v, dict)]
        width = min(32, max([14] + [len(error) + 2 for error in errors]))
        header = f"{'figure':<28}" + "".join(f"{e:>{width}}" for e in engines)
        if len(engines) == 2:
            header += f"{'ours/llama.cpp':>16}"
        print(header)
        for key in figures[engines[0]]:
            values = {e: figures[e].get(key, {"error": "-"}) for e in engines}
            print(f"{key:<28}" + "".join(_cell(values[e], width) for e in engines) + _ratio(engines, values))
        for engine in engines:
            peak, cap = figures[engine]["peak_rss_mb"], figures[engine]["rss_cap_mb"]
            verdict = "" if not _is_number(peak) else ("within" if peak <= cap else "OVER")
            print(f"{engine}: RSS cap = file + KV cache ({figures[engine]['kv_cache_mb']:.1f} MB, "
                  f"float16) + {OVERHEAD_MB} MB = {cap:.0f} MB: "
                  f"peak {verdict}")
    if report.get("paired"):
        from .bench_paired import paired_rows
        print("\nboth engines in one process, taking turns (ours/llama.cpp: median of the rounds' ratios, "
              "quartiles):")
        print(f"{'figure':<28}{'ggml_backend':>14}{'llama.cpp':>14}{'ours/llama.cpp':>16}{'quartiles':>14}")
        for name, ours, theirs, ratio, q1, q3 in paired_rows(report["paired"]):
            if ours is None:
                print(name)
            else:
                print(f"{name:<28}{ours:>14.2f}{theirs:>14.2f}{ratio:>16.2f}{f'{q1:.2f}-{q3:.2f}':>14}")
    kernels = report.get("kernels")
    if kernels:
        from .bench_kernels import format_report
        print("\n" + (f"decode kernels: {kernels['error']}" if "error" in kernels else format_report(kernels)))
    scaling = report.get("scaling")
    if scaling and scaling["sizes"]:
        print("\nspeed against model size (prompt tok/s | decode tok/s):")
        print(f"{'model':<12}{'file MB':>9}{'layers':>7}{'n_embd':>7}{'prompt':>7}{'gen':>5}"
              + "".join(f"{e + ' pp':>22}{e + ' tg':>22}" for e in engines))
        for row in scaling["sizes"]:
            cells = "".join(_cell(row["figures"][e]["prompt_tok_s"], 22) + _cell(row["figures"][e]["decode_tok_s"], 22)
                            for e in engines)
            print(f"{row['model']:<12}{row['file_mb']:>9.0f}{row['n_layer']:>7}{row['n_embd']:>7}"
                  f"{row['prompt_tokens']:>7}{row['gen_tokens']:>5}{cells}")
    if scaling and scaling["positions"]:
        print("\ndecode tok/s against context position (-m model):")
        print(f"{'position':<10}" + "".join(f"{e:>22}" for e in engines))
        for row in scaling["positions"]:
            print(f"{row['position']:<10}" + "".join(_cell(row["figures"][e]["decode_tok_s"], 22) for e in engines))


def _md(value) -> str:
    if isinstance(value, dict):
        return value["error"]
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def markdown_report(report: dict) -> str:
    """The report as Markdown tables, with its conditions (for benchmarks/README.md)."""
    engines, cond, machine = report["engines"], report["conditions"], report["machine"]
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores ({', '.join(machine['flags'])}); "
             f"load average (1, 5, 15 min) {report['load_average_before']} before, "
             f"{report['load_average_after']} after; {report['date']}. Model: `{Path(report['model']).name}` "
             f"({report['model_facts']['file_bytes'] / MB:.0f} MB); {cond['threads']} threads, n_ctx {cond['n_ctx']}, "
             f"{cond['gen']} decode steps per decode figure; median of {cond['repeat']} run(s), each figure from a "
             f"fresh process.", ""]
    two = len(engines) == 2
    if report.get("figures"):
        figures = report["figures"]
        lines += ["| figure | " + " | ".join(engines) + (" | ours/llama.cpp |" if two else " |"),
                  "|---" * (len(engines) + 1 + two) + "|"]
        for key in figures[engines[0]]:
            values = [figures[e].get(key, {"error": "-"}) for e in engines]
            ratio = ""
            if two:
                ratio = f" {values[0] / values[1]:.2f} |" if all(map(_is_number, values)) and values[1] else " - |"
            lines.append(f"| {key} | " + " | ".join(_md(v) for v in values) + " |" + ratio)
        lines.append("")
    if report.get("paired"):
        from .bench_paired import paired_rows
        lines += ["Both engines in one process, taking turns (decode: blocks of steps; prompts: one each; the order "
                  "swapped every round): tok/s, and the median of the rounds' ratios with its quartiles.", "",
                  "| figure | ggml_backend | llama.cpp | ours/llama.cpp | quartiles |", "|---|---|---|---|---|"]
        for name, ours, theirs, ratio, q1, q3 in paired_rows(report["paired"]):
            lines.append(f"| {name} | - | - | - | - |" if ours is None else
                         f"| {name} | {_md(ours)} | {_md(theirs)} | {ratio:.2f} | {q1:.2f}-{q3:.2f} |")
        lines.append("")
    kernels = report.get("kernels")
    if kernels and "error" not in kernels:
        from .bench_kernels import kernel_rows, layouts_note
        if "prompt_path" in kernels:
            lines += [f"Prompts on {kernels['prompt_path']}.", ""]
        scaling = kernels.get("thread_scaling")
        simd = f", {kernels['simd_read_gbps']:.1f} GB/s by vector loads" if "simd_read_gbps" in kernels else ""
        header, rule = "| type | GB/s per core | of read bandwidth |", "|---|---|---|"
        if scaling:
            n, (one, many) = scaling["threads"], scaling["read_gbps"]
            lines += [f"{n} threads against one (wall time, the two alternating): memory read by vector loads "
                      f"{many:.1f} against {one:.1f} GB/s ({many / one:.2f}x); each kernel in the table's last "
                      "columns.", ""]
            header += f" {n} threads GB/s | x one |"
            rule += "---|---|"
        lines += [f"Decode kernels, one core ({kernels['kernel_path']} path; memory read "
                  f"{kernels['read_gbps']:.1f} GB/s by numpy's sum{simd}):", ""]
        lines += [header, rule]
        for name, gbps, of_read, many, gain in kernel_rows(kernels):
            cells = f" {many:.1f} | {gain:.2f} |" if many else ""
            lines.append(f"| {name} | {gbps:.1f} | {of_read:.2f} |{cells}")
        if kernels.get("layouts"):
            lines += ["", layouts_note(kernels)]
        lines.append("")
    scaling = report.get("scaling")
    if scaling and scaling["sizes"]:
        lines += ["| model | file MB | layers | n_embd | prompt tokens | decode steps | "
                  + " | ".join(f"{e} prompt tok/s | {e} decode tok/s" for e in engines) + " |",
                  "|---" * (6 + 2 * len(engines)) + "|"]
        for row in scaling["sizes"]:
            cells = " | ".join(f"{_md(row['figures'][e]['prompt_tok_s'])} | {_md(row['figures'][e]['decode_tok_s'])}"
                               for e in engines)
            lines.append(f"| {row['model']} | {row['file_mb']:.0f} | {row['n_layer']} | {row['n_embd']} | "
                         f"{row['prompt_tokens']} | {row['gen_tokens']} | {cells} |")
        lines.append("")
    if scaling and scaling["positions"]:
        lines += ["| position | " + " | ".join(f"{e} decode tok/s" for e in engines) + " |",
                  "|---" * (1 + len(engines)) + "|"]
        for row in scaling["positions"]:
            lines.append(f"| {row['position']} | "
                         + " | ".join(_md(row["figures"][e]["decode_tok_s"]) for e in engines) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- entry point

# what every renderer reads from a saved report, whatever it measured
_REPORT_KEYS = ("model", "engines", "machine", "date", "load_average_before", "load_average_after", "model_facts",
                "conditions")


def load_report(path: str) -> dict:
    """A report saved by ``--json``; ValueError naming the file unless it is a JSON object with the keys every
    renderer reads."""
    report = json.loads(Path(path).read_text())
    missing = [key for key in _REPORT_KEYS if key not in report] if isinstance(report, dict) else list(_REPORT_KEYS)
    if missing:
        raise ValueError(f"{path} is not a report saved by 'ggml-backend bench --json' (missing {', '.join(missing)})")
    return report


def run(args) -> int:
    if args.from_json:
        report = load_report(args.from_json)
        print(markdown_report(report) if args.markdown else json.dumps(report, indent=2) if args.json
              else _text(report))
        return 0
    _validate(args)
    model = args.model
    if model is None:
        from ..default_model import default_model_path
        model = str(default_model_path())
    if not Path(model).is_file():
        raise FileNotFoundError(f"{model}: no such model file")
    engines = _engines(args.engines)
    if not engines:
        raise ValueError("no engine to measure")
    if args.paired and engines != list(ENGINES):
        raise ValueError("--paired measures ggml_backend beside llama.cpp: it needs both engines (--engines "
                         "ggml_backend,llama.cpp, and llama-cpp-python installed)")
    facts = model_facts(model, args.ctx_size)
    report = {"model": model, "engines": engines, "machine": machine_description(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "load_average_before": load_average(), "model_facts": facts,
              "conditions": {"threads": args.threads, "n_ctx": args.ctx_size, "n_batch": 512,
                             "prompt_tokens": args.prompt_tokens, "long_prompt_tokens": args.long_prompt_tokens,
                             "gen": args.gen, "near_position": args.near_position,
                             "deep_position": args.deep_position, "repeat": args.repeat}}
    if args.paired:
        report["conditions"].update(paired_rounds=args.paired_rounds, paired_prompt_rounds=args.paired_prompt_rounds)
    if not ((args.scaling or args.paired) and args.skip_basic):
        report["figures"] = {}
        for engine in engines:
            report["figures"][engine] = basic_figures(engine, model, args)
            _progress(f"{engine} done", args)
        for engine in engines:
            figures = report["figures"][engine]
            kv_bytes = figures["kv_cache_mb"] * MB if "kv_cache_mb" in figures else facts["kv_cache_bytes"][engine]
            figures["kv_cache_mb"] = kv_bytes / MB
            figures["rss_cap_mb"] = rss_cap_mb(facts, engine, kv_bytes)
    if args.paired:
        from .bench_paired import paired_figures
        report["paired"] = paired_figures(model, args)
    if args.scaling:
        report["scaling"] = scaling_tables(engines, model, args)
    if "ggml_backend" in engines and not args.no_kernels:
        report["kernels"] = kernel_figures(args.timeout, args.threads)
        _progress("kernels done", args)
    report["load_average_after"] = load_average()
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.markdown:
        print(markdown_report(report))
    else:
        print_report(report)
    return 0


def _text(report: dict) -> str:
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_report(report)
    return out.getvalue().rstrip("\n")
