#!/usr/bin/env python3
"""Speculative decoding by prompt lookup, side by side in one run: llama-cpp-python with and without its
``LlamaPromptLookupDecoding`` draft model, and ours with and without ours, on the same file and prompts.

usage: python benchmarks/bench_speculative.py [-m MODEL] [--threads 2] [--max-tokens 160] [--draft 10]
                                              [--repeat 3] [--engines llamacpp,ours] [--json OUT]

Each (engine, mode) runs in a fresh process that loads the model, warms up with one short completion (not timed),
then times ``create_completion`` of each prompt at temperature 0 with end-of-generation allowed (the prompts ask
for bounded answers), ``max_tokens`` tokens at most: decode tokens/s = completion tokens / (time - the prompt's
evaluation, timed alone beforehand from an empty cache and subtracted). The processes alternate, the sweep
repeats ``--repeat`` times, each figure is the median. The prompts (chat-formatted for Qwen2.5): an edit that
repeats most of a function ("edit"), repeating a block verbatim ("copy"), free prose ("prose") and new code
("code"): prompt lookup pays on the first two and should cost nothing on the others. ``same_text`` says whether
each engine's two modes gave the same text (they should: greedy decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ggml_backend._threading import environment_for_other_engines

REPO = Path(__file__).resolve().parent.parent

FUNCTION = '''def parse_range(text, default_step=1):
    """Parse "a-b" or "a-b:step" into a list of integers."""
    text = text.strip()
    if not text:
        raise ValueError("empty range")
    if ":" in text:
        span, step = text.split(":", 1)
        step = int(step)
    else:
        span, step = text, default_step
    start, end = span.split("-", 1)
    start, end = int(start), int(end)
    if step <= 0:
        raise ValueError("step must be positive")
    return list(range(start, end + 1, step))
'''


def chat(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = {
    "edit": chat("Rename the parameter `text` to `spec` everywhere in this function and return the whole "
                 f"function, nothing else:\n```python\n{FUNCTION}```"),
    "copy": chat(f"Repeat this code exactly, in a code block:\n```python\n{FUNCTION}```"),
    "prose": chat("Describe a walk along a river in autumn, in one paragraph."),
    "code": chat("Write a Python function that merges overlapping intervals, with a docstring."),
}


def worker(engine: str, mode: str, model: str, threads: int, max_tokens: int, draft: int) -> dict:
    """Runs in the child: load, warm up, time each prompt; returns {prompt: {tok_s, tokens, text}}."""
    if engine == "llamacpp":
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    else:
        from ggml_backend import Llama, LlamaPromptLookupDecoding
    drafter = LlamaPromptLookupDecoding(num_pred_tokens=draft) if mode == "lookup" else None
    llm = Llama(model, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, draft_model=drafter)
    llm.create_completion(chat("Say hello."), max_tokens=8, temperature=0)
    results = {}
    for name, prompt in PROMPTS.items():
        tokens = llm.tokenize(prompt.encode(), special=True)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        prompt_s = time.perf_counter() - t0
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(tokens, max_tokens=max_tokens, temperature=0)
        total_s = time.perf_counter() - t0
        n = out["usage"]["completion_tokens"]
        results[name] = {"tok_s": n / max(total_s - prompt_s, 1e-9), "tokens": n,
                         "text": out["choices"][0]["text"]}
    if engine == "ours" and mode == "lookup":
        results["_acceptance"] = {"drafted": llm.n_drafted, "accepted": llm.n_draft_accepted}
    return results


def run_child(engine, mode, args) -> dict:
    command = [sys.executable, __file__, "--child", engine, mode, "-m", args.model, "--threads", str(args.threads),
               "--max-tokens", str(args.max_tokens), "--draft", str(args.draft)]
    env = environment_for_other_engines() if engine == "llamacpp" else dict(os.environ)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    from ggml_backend.cli.bench import machine_description
    info = machine_description()
    return f"{info['cpu']} ({info['cores']} cores; {', '.join(info['flags'])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--draft", type=int, default=10, help="num_pred_tokens of both draft models")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="llamacpp,ours")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from ggml_backend.default_model import default_model_path
        args.model = str(default_model_path(progress=False))
    if args.child:
        print(json.dumps(worker(*args.child, args.model, args.threads, args.max_tokens, args.draft)))
        return
    runs = {}
    for sweep in range(args.repeat):
        for engine in args.engines.split(","):
            for mode in ("plain", "lookup"):
                result = run_child(engine, mode, args)
                runs.setdefault((engine, mode), []).append(result)
                figures = "  ".join(f"{p} {result[p]['tok_s']:.1f}" for p in PROMPTS)
                print(f"sweep {sweep + 1} {engine:8s} {mode:6s} tok/s: {figures}", flush=True)
    cpu = cpu_line()
    print(f"\n{cpu}; {args.threads} threads; {Path(args.model).name}; max_tokens {args.max_tokens}, "
          f"draft {args.draft}; medians of {args.repeat}")
    print("| prompt | " + " | ".join(f"{e} {m}" for e, m in runs) + " | ours lookup/plain | llama.cpp lookup/plain |"
          " ours lookup / llama.cpp lookup |")
    print("|---" * (len(runs) + 4) + "|")
    report = {"cpu": cpu, "threads": args.threads, "model": args.model, "max_tokens": args.max_tokens,
              "draft": args.draft, "runs": {f"{e} {m}": r for (e, m), r in runs.items()}, "medians": {}}
    for prompt in PROMPTS:
        med = {key: statistics.median(r[prompt]["tok_s"] for r in rs) for key, rs in runs.items()}
        report["medians"][prompt] = {f"{e} {m}": v for (e, m), v in med.items()}
        ratio = lambda a, b: f"{med[a] / med[b]:.2f}" if a in med and b in med else "-"  # noqa: E731
        cells = " | ".join(f"{v:.1f}" for v in med.values())
        print(f"| {prompt} | {cells} | {ratio(('ours', 'lookup'), ('ours', 'plain'))} | "
              f"{ratio(('llamacpp', 'lookup'), ('llamacpp', 'plain'))} | "
              f"{ratio(('ours', 'lookup'), ('llamacpp', 'lookup'))} |")
    for engine in args.engines.split(","):
        same = all(a[p]["text"] == b[p]["text"] for a, b in zip(runs[(engine, "plain")], runs[(engine, "lookup")])
                   for p in PROMPTS)
        report[f"same_text_{engine}"] = same
        print(f"{engine}: lookup gave the same text as plain decoding: {same}")
    accepted = [r["_acceptance"] for r in runs.get(("ours", "lookup"), [])]
    if accepted:
        print("ours: drafted tokens verified / accepted per process: "
              + ", ".join(f"{a['drafted']}/{a['accepted']}" for a in accepted))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
