"""``ggml-backend webui [-m FILE] [--model-dir DIR] [--port N] [--listen] [--share] [--auth USER:PASS] [-c N]
[-t N] [--user-data-dir DIR] [--api URL [--api-key KEY] [--api-model NAME]] [--lookup [--draft-max N]]``: the
text-generation-webui-style web chat (Gradio), on 127.0.0.1 unless ``--listen``; with ``--listen`` or ``--share``
a login is required (``--auth``, or a generated password printed at start). ``--api`` runs the page against a ``ggml-backend serve`` (or any
OpenAI-compatible server) instead of loading a model here.

Gradio and the ``ggml_webui`` package are imported only here, when the command runs.
"""
from __future__ import annotations

import sys

from .lookup import add_lookup_arguments, lookup_draft_max


def add_arguments(parser) -> None:
    parser.add_argument("-m", "--model", default=None, metavar="FILE",
                        help="a GGUF or GGML model file (default: the default Qwen2.5-Coder-0.5B-Instruct model)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--listen", action="store_true",
                        help="listen on all interfaces (0.0.0.0) so other machines can connect; default 127.0.0.1")
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                        help="require this login (with --listen or --share a login is always required: without "
                             "--auth a password is generated and printed)")
    parser.add_argument("--model-dir", default=None, metavar="DIR",
                        help="the folder whose GGUF/GGML files the Model tab offers (default: the folder of -m, or "
                             "of the default model); clients choose from that list only")
    parser.add_argument("-c", "--ctx-size", type=int, default=2048, metavar="N", help="context size (default 2048)")
    parser.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                        help="threads (default: all cores)")
    parser.add_argument("--user-data-dir", default=None, metavar="DIR",
                        help="where characters/, presets/ and logs/ (past chats) live (default: "
                             "$GGML_BACKEND_WEBUI_DIR or ~/.local/share/ggml_backend/webui)")
    parser.add_argument("--api", default=None, metavar="URL",
                        help="use the OpenAI-compatible server at URL (e.g. http://127.0.0.1:8080 from ggml-backend "
                             "serve) instead of loading a model in this process")
    parser.add_argument("--api-key", default=None, metavar="KEY", help="the key --api's server expects")
    parser.add_argument("--api-model", default=None, metavar="NAME",
                        help="the model to ask --api's server for (default: the first it lists)")
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                        help="layers to offload to an NVIDIA GPU (-1: all); needs the cuda extra, else the CPU")
    add_lookup_arguments(parser)


def _check(args) -> None:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.ctx_size < 16:
        raise ValueError(f"--ctx-size must be at least 16, got {args.ctx_size}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError("--auth must be USER:PASSWORD with both parts non-empty")
    if args.model_dir is not None:
        import os
        if not os.path.isdir(args.model_dir):
            raise ValueError(f"--model-dir {args.model_dir}: not a directory")
    if args.api is not None:
        if args.model is not None or args.model_dir is not None:
            raise ValueError("--api uses a remote server's model: -m and --model-dir do not apply")
        if not args.api.startswith(("http://", "https://")):
            raise ValueError(f"--api must be an http:// or https:// URL, got {args.api!r}")
        if args.lookup:
            raise ValueError("--lookup applies to a model loaded here; with --api the server drafts "
                             "(ggml-backend serve --lookup)")
    elif args.api_key is not None or args.api_model is not None:
        raise ValueError("--api-key and --api-model go with --api URL")
    lookup_draft_max(args)
    if args.user_data_dir is not None:
        import os
        if os.path.exists(args.user_data_dir) and not os.path.isdir(args.user_data_dir):
            raise ValueError(f"--user-data-dir {args.user_data_dir}: not a directory")


def run(args) -> int:
    _check(args)
    try:
        from ggml_webui import launch
    except ImportError as exc:
        print(f"ggml-backend webui needs the web UI package and Gradio: pip install 'ggml-backend[gradio]' ({exc})",
              file=sys.stderr)
        return 1
    launch(args.model, port=args.port, listen=args.listen, share=args.share, n_ctx=args.ctx_size,
           n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, auth=args.auth, model_dir=args.model_dir,
           user_data_dir=args.user_data_dir, api_url=args.api, api_key=args.api_key, api_model=args.api_model,
           draft_max=lookup_draft_max(args))
    return 0
