"""Perplexity of one text by ggml_backend and by llama.cpp (llama-cpp-python), same chunks, same thread count.

    python benchmarks/bench_perplexity.py [--model qwen|gemma|FILE] [-c 512] [--chunks N] [-t 2] [-b 2048]
                                          [--repeat 1] [--text FILE] [--json]

Prints each engine's "Final estimate" (PPL +/- its uncertainty, llama.cpp's formula), the relative difference,
and the prompt-processing speed of the run: evaluated tokens (chunks x n_ctx) per second of evaluation.
llama.cpp's side is tests/data/perplexity/make_reference.py's ``llamacpp_perplexity``: llama.cpp's perplexity
procedure on its C API through llama-cpp-python, as the tool runs it (a cleared KV cache and one ``llama_decode``
per chunk, logits asked for the scored half only); its time counts the decoding, not the log-softmax (done in
numpy). Ours is ``ggml_backend.perplexity`` (forward passes and scoring). With ``--repeat`` the two engines
alternate, so a noisy neighbour slows both; the speeds printed are medians.
Timing figures on a shared machine are noisy: repeat, and read them as such.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "data" / "perplexity"))

from make_reference import TEXT, llamacpp_perplexity, read_text   # noqa: E402

from ggml_backend import Llama, perplexity   # noqa: E402


def _model_path(name: str) -> str:
    from ggml_backend.default_model import default_model_path, gemma_model_path
    if name == "qwen":
        return str(default_model_path(progress=False))
    if name == "gemma":
        return str(gemma_model_path())
    return name


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen", help="qwen (default), gemma, or a GGUF file")
    parser.add_argument("--text", default=str(TEXT), help="text file (default: the tests' Python source)")
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None, help="chunks (default: all)")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-b", "--batch-size", type=int, default=2048, help="ours: tokens per pass (default 2048)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    path = _model_path(args.model)
    text = read_text(args.text)
    ours_runs, theirs_runs = [], []
    llm = Llama(path, n_ctx=args.ctx_size, n_threads=args.threads, verbose=False)
    try:
        for _ in range(args.repeat):
            theirs_runs.append(llamacpp_perplexity(path, text, args.ctx_size, args.chunks, args.threads))
            ours_runs.append(perplexity(llm, text, args.ctx_size, n_batch=args.batch_size, chunks=args.chunks,
                                        n_threads=args.threads))
    finally:
        llm.close()
    ours, theirs = ours_runs[-1], theirs_runs[-1]
    ours_speed = statistics.median(r.tokens_per_second for r in ours_runs)
    theirs_speed = statistics.median(r["tokens_per_second"] for r in theirs_runs)
    figures = {
        "cpu": _cpu_name(), "threads": args.threads, "model": Path(path).name, "text": Path(args.text).name,
        "n_ctx": args.ctx_size, "chunks": ours.chunks, "tokens_scored": ours.tokens_scored,
        "ours": {"ppl": ours.ppl, "ppl_std": ours.ppl_std, "tokens_per_second": ours_speed,
                 "runs_tokens_per_second": [r.tokens_per_second for r in ours_runs], "n_batch": args.batch_size},
        "llama_cpp": {"ppl": theirs["ppl"], "ppl_std": theirs["ppl_std"], "tokens_per_second": theirs_speed,
                      "runs_tokens_per_second": [r["tokens_per_second"] for r in theirs_runs]},
        "ppl_relative_difference": ours.ppl / theirs["ppl"] - 1.0,
        "speed_ratio": ours_speed / theirs_speed if theirs_speed else None,
    }
    if ours.chunks != theirs["chunks"] or ours.n_tokens != theirs["n_tokens"]:
        print(f"warning: the engines saw different token streams ({ours.n_tokens} vs {theirs['n_tokens']} tokens)",
              file=sys.stderr)
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"{figures['cpu']}, {args.threads} threads; {figures['model']}; {figures['text']}, -c {args.ctx_size}, "
          f"{ours.chunks} chunks ({ours.tokens_scored} tokens scored, {ours.tokens_evaluated} evaluated); "
          f"{args.repeat} run(s) each")
    print(f"{'engine':<14} {'PPL':>10} {'+/-':>9} {'tokens/s':>9}")
    print(f"{'ggml_backend':<14} {ours.ppl:10.4f} {ours.ppl_std:9.5f} {ours_speed:9.1f}")
    print(f"{'llama.cpp':<14} {theirs['ppl']:10.4f} {theirs['ppl_std']:9.5f} {theirs_speed:9.1f}")
    print(f"PPL ours/llama.cpp - 1 = {figures['ppl_relative_difference'] * 100:+.3f}%; "
          f"speed ours/llama.cpp = {figures['speed_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
