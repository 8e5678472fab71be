"""``ggml-backend batch IN OUT [-m FILE] [-c N] [-t N] [--ray [--ray-address ADDR] [--workers N]]``: offline
generation over a JSONL (or Parquet) file of requests, in this process or on Ray Data actors; see
``ggml_backend.batch`` for the line and record formats, resuming and bad lines.
"""
from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="requests: a .jsonl file (one JSON object a line) or .parquet")
    parser.add_argument("output", metavar="OUT", help="records, appended: .jsonl, or .parquet (written at the end); "
                                                      "a rerun skips the ids it holds")
    parser.add_argument("-m", "--model", default=None, metavar="FILE",
                        help="a GGUF or GGML model file (default: the default Qwen2.5-Coder-0.5B-Instruct model)")
    parser.add_argument("-c", "--ctx-size", type=int, default=4096, metavar="N",
                        help="context of each worker's model in tokens (prompt + reply; default 4096)")
    parser.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                        help="threads per model (default: all cores in one process; 1 per Ray worker)")
    parser.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                        help="chat template for 'messages' lines (default: the model file's own)")
    parser.add_argument("--ray", action="store_true", help="run on Ray Data actors (pip install 'ggml-backend[ray]')")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="a Ray cluster to join (e.g. auto, ray://head:10001); default: a local one for this run")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="Ray actors, each holding one model (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args) -> None:
    if not args.ray and (args.ray_address is not None or args.workers is not None):
        raise ValueError("--ray-address and --workers need --ray")
    for name in ("ctx_size", "threads", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not os.path.isfile(args.input):
        raise ValueError(f"input file not found: {args.input}")
    if args.model is not None and not os.path.isfile(args.model):
        raise ValueError(f"model file not found: {args.model}")


def run(args) -> int:
    check_arguments(args)
    try:
        import fastapi, sse_starlette  # noqa: F401,E401  (the server's request checks are reused)
    except ImportError as exc:
        raise ValueError(f"batch checks requests as the server does and needs its extra: "
                         f"pip install 'ggml-backend[server]' ({exc})") from None
    common = dict(model_path=args.model, n_ctx=args.ctx_size, n_threads=args.threads,
                  chat_template=args.chat_template, progress=not args.no_progress)
    if args.ray:
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"--ray needs Ray: pip install 'ggml-backend[ray]' ({exc})") from None
        from ..batch_ray import run_ray
        summary = run_ray(args.input, args.output, workers=args.workers or 1, address=args.ray_address, **common)
    else:
        from ..batch import run_local
        summary = run_local(args.input, args.output, **common)
    rate = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
    print(f"ggml-backend batch: {summary.total} lines, {summary.skipped} already in {args.output}, "
          f"{summary.written} written ({summary.errors} errors), {summary.tokens} tokens in {summary.seconds:.1f} s "
          f"({rate:.1f} tokens/s)", file=sys.stderr)
    return 1 if summary.errors else 0
