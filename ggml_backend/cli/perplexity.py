"""``ggml-backend perplexity -m FILE -f TEXT [-c 512] [-b 2048] [--chunks N] [-t N] [--json]``: llama.cpp's
``llama-perplexity`` (its default mode), on ``ggml_backend.perplexity``.

Output as llama.cpp prints it: the running value after each chunk (``[1]9.3739,[2]...``), then
``Final estimate: PPL = X +/- Y`` and the prompt-processing timing line (every evaluated token counts, so this
long run shows the prompt path's speed). Those go to stdout; what llama.cpp logs as information (the chunk count,
seconds per pass and ETA) goes to stderr unless ``--log-disable``. ``--json`` prints one JSON object instead.
"""
from __future__ import annotations

import json
import os
import sys

from .common import _rate_line, add_option


def add_arguments(parser) -> None:
    add_option(parser, "-m", "--model", default=None,
               help="GGUF or GGML (ggjt v3) model file (default: the embedded default model)")
    add_option(parser, "-f", "--file", required=True, help="the text file to score (UTF-8)")
    add_option(parser, "-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default: 512)")
    add_option(parser, "-b", "--batch-size", type=int, default=2048,
               help="tokens per pass (default: 2048): below --ctx-size a chunk is evaluated in batches of this "
                    "size; a multiple of it evaluates that many chunks together")
    add_option(parser, "--chunks", type=int, default=-1, help="chunks to evaluate (default: -1 = all)")
    add_option(parser, "-t", "--threads", type=int, default=None, help="number of threads (default: all cores)")
    add_option(parser, "-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=0,
               help="layers to offload to an NVIDIA GPU (-1: all); needs the cuda extra, else runs on the CPU")
    add_option(parser, "-mg", "--main-gpu", type=int, default=0, help="the GPU to use (default: 0)")
    add_option(parser, "--json", action="store_true", help="print one JSON object instead of llama.cpp's lines")
    add_option(parser, "--log-disable", action="store_true",
               help="no informational messages on stderr (errors are still printed)")


def _check_arguments(args) -> None:
    if args.ctx_size < 1:
        raise ValueError(f"perplexity needs --ctx-size > 0, got {args.ctx_size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size >= args.ctx_size and args.batch_size % args.ctx_size:
        raise ValueError(f"--batch-size ({args.batch_size}) must be below --ctx-size ({args.ctx_size}) or a "
                         f"multiple of it")
    if args.chunks == 0 or args.chunks < -1:
        raise ValueError(f"--chunks must be >= 1, or -1 for all, got {args.chunks}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.model is not None:
        if not os.path.exists(args.model):
            raise FileNotFoundError(f"model file not found: {args.model}")
        if os.path.isdir(args.model):
            raise IsADirectoryError(f"model path is a directory, not a file: {args.model}")


def _eta(seconds_per_pass: float, n_chunk: int, n_seq: int) -> str:
    """llama.cpp's "ETA" words: whole hours, then minutes with two decimals."""
    total = int(seconds_per_pass * n_chunk / n_seq)
    text = ""
    if total >= 3600:
        text = f"{total // 3600} hours "
        total %= 3600
    return text + f"{total / 60.0:.2f} minutes"


def run(args) -> int:
    from ..ppl import perplexity, read_text_file
    _check_arguments(args)
    text = read_text_file(args.file)          # before the model: a missing text costs no loading time
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if not args.log_disable else (lambda m: None)
    from ..api import Llama
    model_path = args.model
    if model_path is None:
        from ..default_model import default_model_path
        model_path = default_model_path(progress=not args.log_disable)
    n_ctx = args.ctx_size
    llm = Llama(model_path, n_ctx=n_ctx, n_batch=min(args.batch_size, n_ctx), n_threads=args.threads,
                n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu, verbose=not args.log_disable)
    chunks = None if args.chunks == -1 else args.chunks
    n_seq = max(1, args.batch_size // n_ctx)
    state = {"started": False}

    def progress(chunk_number: int, running_ppl: float, pass_seconds: float) -> None:
        if args.json:
            return
        if not state["started"]:
            state["started"] = True
            log(f"perplexity: {pass_seconds:.2f} seconds per pass - ETA "
                f"{_eta(pass_seconds, state['n_chunk'], n_seq)}")
        print(f"[{chunk_number}]{running_ppl:.4f},", end="", flush=True)

    def on_start(n_chunk: int, n_tokens: int) -> None:
        state["n_chunk"] = n_chunk
        if not args.json:
            log(f"perplexity: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, "
                f"batch_size={args.batch_size}, n_seq={n_seq}")

    try:
        result = perplexity(llm, text, n_ctx, n_batch=args.batch_size, chunks=chunks, n_threads=llm.n_threads,
                            on_start=on_start, progress=progress)
    finally:
        llm.close()
    if args.json:
        figures = result.as_dict()
        figures["model"] = os.fspath(model_path)
        figures["text"] = args.file
        figures["n_threads"] = llm.n_threads
        if figures["ppl_std"] != figures["ppl_std"]:
            figures["ppl_std"] = None     # NaN is not JSON
        print(json.dumps(figures))
        return 0
    print()
    if result.ppl_std == result.ppl_std:       # not NaN
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_std:.5f}")
    else:
        print(f"Final estimate: PPL = {result.ppl:.4f} (unexpected negative standard deviation of log(prob))")
    print(_rate_line("prompt eval time", result.eval_seconds, result.tokens_evaluated, "tokens"))
    return 0
