#!/usr/bin/env python3
"""The seed's size class: a 13B-shaped GGML v3 q4_0 file (about 7.3 GB), memory-mapped.

1. Writes a LLaMA-13B-shaped ggjt v3 q4_0 file (n_embd 5120, 40 layers, n_ff 13824, 40 heads, vocab 32000; output
   matrix q6_K as llama.cpp's quantizer made it) with ``write_ggml``, tensor by tensor from streaming callables,
   and reports the writer's peak RSS (it must stay small: nothing holds a whole tensor).
2. Converts it to GGUF with ``ggml-backend convert`` (for llama.cpp, which reads GGUF only).
3. In fresh processes: ``Llama`` on the GGML file (ours), on the GGUF (ours) and llama.cpp on the GGUF: RSS right
   after load (memory-mapped: far below the file size), then a short prompt, a few greedy decode steps, decode
   tok/s and peak RSS, which must stay under the seed card's "Max RAM required" of 9.82 GB.

usage: python benchmarks/large_ggml_13b.py [--dir DIR] [--gen 4] [--n-ctx 512] [--keep] [--engines ...]
The big files are deleted at the end unless --keep. Our KV cache is float32: at n_ctx 512 it is 0.84 GB (2048
would need 3.4 GB and break the 9.82 GB cap; llama.cpp's float16 cache is half of ours).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ggml_backend.cli.bench import load_average, machine_description, run_worker
from ggml_backend.cli.bench_models import SHAPES, bench_models_dir, file_size_estimate

MAX_RAM_GB = 9.82
GB = 1e9

# One engine on one file in a fresh process: RSS after load, then a prompt and timed greedy decoding.
_WORKER = r'''
import json, sys, time
import numpy as np
engine, model, n_ctx, threads, n_prompt, n_gen = sys.argv[1:7]
n_ctx, threads, n_prompt, n_gen = int(n_ctx), int(threads), int(n_prompt), int(n_gen)
def peak_rss():
    # VmHWM, not ru_maxrss: a child started by vfork/exec inherits its parent's ru_maxrss
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
t = time.perf_counter()
if engine == "llama.cpp":
    import llama_cpp
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                          n_batch=512, use_mmap=True)
    def last_logits():
        # llama-cpp-python 0.3 fills llm.scores only with logits_all; the context holds the last token's logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
else:
    from ggml_backend import Llama
    extra = {"rms_norm_eps": 1e-5} if model.endswith(".bin") else {}
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, verbose=False, n_batch=512, **extra)
    def last_logits():
        return llm.scores[llm.n_tokens - 1]
result = {"open_s": time.perf_counter() - t, "rss_after_load": rss_now()}
rng = np.random.default_rng(0)
prompt = [int(x) for x in rng.integers(100, 3000, n_prompt)]
t = time.perf_counter(); llm.eval(prompt); result["prompt_tok_s"] = n_prompt / (time.perf_counter() - t)
tok = int(np.argmax(last_logits()))
tokens = []
t = time.perf_counter()
for _ in range(n_gen):
    llm.eval([tok]); tok = int(np.argmax(last_logits())); tokens.append(tok)
result["decode_tok_s"] = n_gen / (time.perf_counter() - t)
result["tokens"] = tokens
result["logits_finite"] = bool(np.isfinite(last_logits()).all())
result["peak_rss"] = peak_rss()
print("RESULT " + json.dumps(result), flush=True)
'''

# The writer in its own process, so its peak RSS is its own.
_WRITER = r'''
import json, sys
from ggml_backend.cli.bench_models import LlamaShape, write_synthetic_ggml
def peak_rss():
    # VmHWM, not ru_maxrss: a child started by vfork/exec inherits its parent's ru_maxrss
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
write_synthetic_ggml(sys.argv[1], LlamaShape(**json.loads(sys.argv[2])), "q4_0", progress=True)
print("RESULT " + json.dumps({"rss_before": before, "peak_rss": peak_rss()}), flush=True)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(bench_models_dir()))
    ap.add_argument("--shape", default="13b", choices=sorted(SHAPES))
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--gen", type=int, default=4)
    ap.add_argument("--engines", default="ggml_backend:ggml,llama.cpp:gguf",
                    help="ENGINE:FILE pairs; FILE ggml (the written file) or gguf (its conversion)")
    ap.add_argument("--keep", action="store_true", help="keep the big files")
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args()

    shape = SHAPES[a.shape]
    directory = Path(a.dir)
    directory.mkdir(parents=True, exist_ok=True)
    ggml_path = directory / f"synthetic-llama-{a.shape}-q4_0.ggmlv3.bin"
    gguf_path = directory / f"synthetic-llama-{a.shape}-q4_0.converted.gguf"
    need = 2 * file_size_estimate(shape, "q4_0") * 1.01
    free = shutil.disk_usage(directory).free
    if free < need and not (ggml_path.exists() and gguf_path.exists()):
        print(f"not enough disk in {directory}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed", file=sys.stderr)
        return 1
    report = {"machine": machine_description(), "load_average_before": load_average(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "shape": a.shape, "n_ctx": a.n_ctx, "threads": a.threads,
              "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen}
    try:
        if not ggml_path.exists():
            t = time.perf_counter()
            writer = run_worker([sys.executable, "-c", _WRITER, str(ggml_path), json.dumps(vars(shape))], a.timeout)
            if "error" in writer:
                print(f"writing {ggml_path}: {writer['error']}", file=sys.stderr)
                return 1
            writer["seconds"] = time.perf_counter() - t
            report["write"] = writer
            print(f"wrote {ggml_path} ({ggml_path.stat().st_size / GB:.2f} GB) in {writer['seconds']:.0f} s; "
                  f"writer RSS {writer.get('rss_before', 0) / 1e6:.0f} MB before, peak "
                  f"{writer.get('peak_rss', 0) / 1e6:.0f} MB", flush=True)
        report["ggml_bytes"] = ggml_path.stat().st_size
        # a conversion cut short leaves a shorter file: redo it
        if not gguf_path.exists() or gguf_path.stat().st_size < report["ggml_bytes"] * 0.99:
            t = time.perf_counter()
            convert = subprocess.run([sys.executable, "-m", "ggml_backend", "convert", str(ggml_path), str(gguf_path),
                                      "--eps", "1e-5", "--no-progress", "--force"], capture_output=True, text=True)
            if convert.returncode:
                print(convert.stderr, file=sys.stderr)
                return 1
            report["convert_s"] = time.perf_counter() - t
            print(f"converted to {gguf_path} in {report['convert_s']:.0f} s", flush=True)
        report["gguf_bytes"] = gguf_path.stat().st_size
        report["runs"] = {}
        for pair in a.engines.split(","):
            engine, _, kind = pair.partition(":")
            path = ggml_path if kind == "ggml" else gguf_path
            result = run_worker([sys.executable, "-c", _WORKER, engine, str(path), str(a.n_ctx), str(a.threads),
                                 str(a.prompt_tokens), str(a.gen)], a.timeout)
            report["runs"][pair] = result
            print(f"{pair}: " + json.dumps(result), flush=True)
    finally:
        if not a.keep:
            for path in (ggml_path, gguf_path):
                if path.exists():
                    path.unlink()
    report["load_average_after"] = load_average()
    print_summary(report)
    print("JSON " + json.dumps(report))
    return 0


def print_summary(report: dict) -> None:
    print(f"\n{report['shape']}-shaped q4_0: GGML {report['ggml_bytes'] / GB:.2f} GB, GGUF "
          f"{report['gguf_bytes'] / GB:.2f} GB; n_ctx {report['n_ctx']}, {report['threads']} threads, "
          f"prompt {report['prompt_tokens']} tokens, decode {report['gen_tokens']}; load average "
          f"{report['load_average_before']} -> {report['load_average_after']}")
    if "write" in report and "peak_rss" in report["write"]:
        print(f"writer peak RSS: {report['write']['peak_rss'] / 1e6:.0f} MB")
    print(f"{'engine:file':<22}{'open s':>8}{'RSS after load GB':>19}{'peak RSS GB':>13}{'prompt tok/s':>14}"
          f"{'decode tok/s':>14}  under {MAX_RAM_GB} GB")
    for pair, r in report["runs"].items():
        if "error" in r:
            print(f"{pair:<22}{r['error']}")
            continue
        print(f"{pair:<22}{r['open_s']:>8.2f}{r['rss_after_load'] / GB:>19.2f}{r['peak_rss'] / GB:>13.2f}"
              f"{r['prompt_tok_s']:>14.2f}{r['decode_tok_s']:>14.3f}  {'yes' if r['peak_rss'] < MAX_RAM_GB * GB else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
