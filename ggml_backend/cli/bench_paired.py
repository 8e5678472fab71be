"""``ggml-backend bench --paired``: ggml_backend and llama.cpp in one process, taking turns.

Why: the memory bandwidth a process gets on a shared VM moves with its neighbours, over seconds, by a third or more
(a 2-core AMD EPYC Zen 4 VM, 7 December 2026: BF16 Qwen2.5-0.5B decode steps of one process went between about 20
and 31 ms every 10 to 20 s, for either engine, which fresh processes then sample at random), so two engines measured
in separate processes, even alternating, are often measured at different speeds of the machine. Here both load the
same file in one process and take turns in short blocks: a block of decode steps each, or one prompt each, the
order swapped every round. A round's ratio compares two measurements taken within a second of each other; the
report gives the median of the rounds' ratios with its quartiles, and each engine's median speed.

The worker imports llama_cpp before ggml_backend: llama.cpp's OpenMP reads its wait policy when it loads, and
importing ggml_backend sets ``OMP_WAIT_POLICY=PASSIVE`` for numba's OpenMP layer where the user set none
(_threading.py), which would slow llama.cpp's threads (bench.py gives each engine the user's environment for the
same reason). ggml_backend's threads are tbb's on x86 (a dependency), so the two pools do not share a policy.
"""
from __future__ import annotations

import sys
import time

# Decode steps an engine takes per turn, and how many of its first steps are not counted: right after the other
# engine's turn, llama.cpp's idle OpenMP threads still spin for a while and either engine finds the caches full
# of the other's data.
DECODE_BLOCK = 8
DECODE_SKIP = 2

# One paired measurement, run in a fresh interpreter: prints one line "RESULT {json}" with each engine's kept step
# times per round.
_PAIRED_WORKER = r'''
import json, sys
import llama_cpp          # first: see bench_paired's docstring
import numpy as np
model, threads, n_ctx, task, a, rounds, block, skip, warm_prompt = sys.argv[1:10]
threads, n_ctx, a, rounds, block, skip, warm_prompt = map(int, (threads, n_ctx, a, rounds, block, skip, warm_prompt))
theirs = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, n_batch=512)
from ggml_backend import Llama
from ggml_backend.cli.bench_paired import take_turns
ours = Llama(model, n_ctx=n_ctx, n_threads=threads, verbose=False, n_batch=512)
engines = {"ggml_backend": ours, "llama.cpp": theirs}
rng = np.random.default_rng(0)
n_vocab = ours.n_vocab()
def random_ids(n):
    return [int(x) for x in rng.integers(min(100, n_vocab // 4), min(3000, n_vocab), n)]
for llm in engines.values():    # the basic figures' warm-up (bench.py), each engine in turn
    llm.eval(random_ids(1)); llm.eval(random_ids(8)); llm.reset(); llm.eval(random_ids(warm_prompt)); llm.reset()
if task == "decode":
    prompt = random_ids(a)
    for llm in engines.values():
        llm.eval(prompt)
    ids = random_ids(rounds * block)
    taken = {name: 0 for name in engines}
    def step(name):
        engines[name].eval([ids[taken[name]]])
        taken[name] += 1
    times = take_turns(list(engines), step, rounds, block, skip)
elif task == "prompt":
    prompt = random_ids(a)
    def step(name):
        engines[name].reset(); engines[name].eval(prompt)
    times = take_turns(list(engines), step, rounds, 1, 0)
else:
    raise SystemExit(f"unknown task {task}")
print("RESULT " + json.dumps({"times": times}), flush=True)
'''


def take_turns(names: list[str], step, rounds: int, block: int, skip: int, clock=time.perf_counter) -> dict:
    """Call ``step(name)`` ``block`` times for each engine in turn, ``rounds`` times, the order reversed every other
    round; {name: [[seconds of each kept step] per round]}, the first ``skip`` steps of each turn left out."""
    if not 0 <= skip < block:
        raise ValueError(f"skip must be in [0, block): got skip {skip}, block {block}")
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            kept = []
            for i in range(block):
                start = clock()
                step(name)
                if i >= skip:
                    kept.append(clock() - start)
            times[name].append(kept)
    return times


def _median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _quartiles(values) -> tuple[float, float]:
    values = sorted(values)
    half = len(values) // 2
    low, high = values[:half] or values, values[len(values) - half:] or values
    return _median(low), _median(high)


def paired_summary(times: dict, tokens_per_step: int = 1, ours: str = "ggml_backend",
                   theirs: str = "llama.cpp") -> dict:
    """From ``take_turns``' times: each round's speed ratio (ours over theirs: the ratio of the median step times of
    the two turns, theirs over ours), the median of those ratios and its quartiles, and each engine's median speed
    over all kept steps (``tokens_per_step`` tokens a step)."""
    rounds = list(zip(times[ours], times[theirs]))
    if not rounds or any(not a or not b for a, b in rounds):
        raise ValueError("every round needs kept steps of both engines")
    ratios = [_median(b) / _median(a) for a, b in rounds]
    q1, q3 = _quartiles(ratios)
    speed = {name: tokens_per_step / _median([t for turn in times[name] for t in turn]) for name in (ours, theirs)}
    return {"ratio": _median(ratios), "ratio_q1": q1, "ratio_q3": q3, "rounds": len(ratios),
            f"{ours}_tok_s": speed[ours], f"{theirs}_tok_s": speed[theirs]}


def paired_figures(model: str, args) -> dict:
    """The paired figures: decode on ``args.threads`` threads and on one (from ``args.prompt_tokens`` on), and the
    two prompts; each from its own fresh process, {"error": ...} in the place of one that failed."""
    from ..model.session import prompt_kernels_from
    from .bench import _progress, run_worker
    from .._threading import environment_for_other_engines
    from ..compile_helpers import ENV as COMPILE_HELPERS
    env = environment_for_other_engines()
    env[COMPILE_HELPERS] = "0"
    tasks = {f"decode_{args.threads}_threads": ("decode", args.threads, args.prompt_tokens, DECODE_BLOCK, DECODE_SKIP)}
    if args.threads > 1:
        tasks["decode_1_thread"] = ("decode", 1, args.prompt_tokens, DECODE_BLOCK, DECODE_SKIP)
    tasks[f"prompt_{args.prompt_tokens}"] = ("prompt", args.threads, args.prompt_tokens, 1, 0)
    tasks[f"prompt_{args.long_prompt_tokens}"] = ("prompt", args.threads, args.long_prompt_tokens, 1, 0)
    figures = {}
    for name, (task, threads, a, block, skip) in tasks.items():
        rounds = args.paired_rounds if task == "decode" else args.paired_prompt_rounds
        cmd = [sys.executable, "-c", _PAIRED_WORKER, model, str(threads), str(args.ctx_size), task, str(a),
               str(rounds), str(block), str(skip), str(prompt_kernels_from())]
        result = run_worker(cmd, args.timeout, env=env)
        if "error" in result:
            figures[name] = {"error": result["error"]}
        else:
            figures[name] = paired_summary(result["times"], a if task == "prompt" else 1)
            figures[name].update(threads=threads, steps_per_turn=block - skip)
        _progress(f"paired {name} done", args)
    return figures


def paired_rows(paired: dict) -> list[tuple]:
    """(figure, ours tok/s, llama.cpp tok/s, median ratio, q1, q3) per paired figure, None for a failed one's
    numbers (with its error as the figure's name)."""
    rows = []
    for name, figure in paired.items():
        if "error" in figure:
            rows.append((f"{name}: {figure['error']}", None, None, None, None, None))
        else:
            rows.append((name, figure["ggml_backend_tok_s"], figure["llama.cpp_tok_s"], figure["ratio"],
                         figure["ratio_q1"], figure["ratio_q3"]))
    return rows
