"""``ggml-backend serve [-m FILE] [--host 127.0.0.1] [--port 8080] [-c N] [-t N] [-np N] [--api-key KEY]
[--alias NAME] [--cors ORIGIN] [--chat-template NAME|FILE] [--models CONFIG.yaml] [--ray [--replicas N |
--autoscale MIN:MAX] [--ray-address ADDR]]``: an HTTP server speaking OpenAI's, KoboldCpp's and llama.cpp's server
APIs (see ``ggml_backend.server``); with ``--ray`` the same app as a Ray Serve application of several replicas
(``ggml_backend.server.ray_serve``).

It binds 127.0.0.1 unless ``--host`` says otherwise; a server reachable from other machines always asks for an API
key (``--api-key``, or one generated and printed at start).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import sys

from ..model.kv_cache import CACHE_TYPES
from ..server.config import (DEFAULT_MAX_BODY_BYTES, DEFAULT_N_CTX, DEFAULT_N_PARALLEL, DEFAULT_QUEUE_LIMIT,
                             ModelConfig)
from .lookup import add_lookup_arguments, lookup_draft_max


def add_arguments(parser) -> None:
    parser.add_argument("-m", "--model", default=None, metavar="FILE",
                        help="a GGUF or GGML model file (default: the default Qwen2.5-Coder-0.5B-Instruct model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; any other requires an API key)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("-c", "--ctx-size", type=int, default=DEFAULT_N_CTX, metavar="N",
                        help=f"context of all slots together, each slot gets N / -np (default {DEFAULT_N_CTX})")
    parser.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: all cores)")
    parser.add_argument("-ctk", "--cache-type-k", default="f16", choices=CACHE_TYPES,
                        help="KV cache type of the keys: f16 (default), f32 or q8_0")
    parser.add_argument("-ctv", "--cache-type-v", default="f16", choices=CACHE_TYPES,
                        help="KV cache type of the values: f16 (default), f32 or q8_0")
    parser.add_argument("-np", "--parallel", type=int, default=DEFAULT_N_PARALLEL, metavar="N",
                        help=f"slots: requests in flight at once (default {DEFAULT_N_PARALLEL})")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require this key (Authorization: Bearer KEY or X-API-Key) on every route but /health; "
                             "also read from $GGML_BACKEND_API_KEY")
    parser.add_argument("--alias", default=None, metavar="NAME",
                        help="the model's name in the API (default: the file's name)")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="allow browsers on this origin (repeatable; '*' for any); default: no CORS")
    parser.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                        help="chat template (default: the model file's own)")
    parser.add_argument("--models", default=None, metavar="CONFIG.yaml",
                        help="serve several models listed in a YAML file (see ggml_backend.server.config)")
    parser.add_argument("--queue-limit", type=int, default=DEFAULT_QUEUE_LIMIT, metavar="N",
                        help=f"requests waiting for a slot beyond which the answer is 503 (default {DEFAULT_QUEUE_LIMIT})")
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="BYTES",
                        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                        help="layers to offload to an NVIDIA GPU (-1: all); needs the cuda extra, else the CPU")
    parser.add_argument("--no-mmap", action="store_true",
                        help="read the model file into memory (huge pages: faster decode, slower load) instead of "
                             "mapping it")
    parser.add_argument("-mg", "--main-gpu", type=int, default=0, metavar="I", help="the GPU to use (default 0)")
    add_lookup_arguments(parser)   # in every slot
    ray = parser.add_argument_group("Ray Serve (pip install 'ggml-backend[ray]')")
    ray.add_argument("--ray", action="store_true",
                     help="deploy as a Ray Serve application: replicas each holding the model; -t is each "
                          "replica's threads and CPUs (default 1)")
    ray.add_argument("--replicas", type=int, default=None, metavar="N", help="replicas (default 1)")
    ray.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                     help="replicas scaled by Ray Serve on requests in flight (one replica per -np of them)")
    ray.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="a Ray cluster to join (e.g. auto); default: a local one for this server")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_config(args):
    from ..server import ServerConfig, load_models_file
    if args.model is not None and not os.path.isfile(args.model):
        raise ValueError(f"model file not found: {args.model}")
    if args.models and (args.model or args.alias):
        raise ValueError("--models lists the models; do not also give -m/--alias")
    draft_max = lookup_draft_max(args)
    defaults = ModelConfig(alias=args.alias or _alias_of(args.model), path=args.model, n_ctx=args.ctx_size,
                           n_parallel=args.parallel, chat_template=args.chat_template, n_threads=args.threads,
                           cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                           n_gpu_layers=args.n_gpu_layers, main_gpu=args.main_gpu, use_mmap=not args.no_mmap,
                           draft_max=draft_max)
    models = load_models_file(args.models, defaults) if args.models else [defaults]
    api_key = args.api_key or os.environ.get("GGML_BACKEND_API_KEY") or None
    generated = False
    if not _is_loopback(args.host) and not api_key:
        api_key, generated = secrets.token_urlsafe(24), True
    config = ServerConfig(models=models, host=args.host, port=args.port, api_key=api_key,
                          cors_origins=list(args.cors), queue_limit=args.queue_limit, max_body_bytes=args.max_body)
    config.check()
    return config, generated


def _alias_of(path: str | None) -> str:
    if path is None:
        from ..default_model import DEFAULT_MODEL_NAME
        path = DEFAULT_MODEL_NAME
    name = os.path.basename(path)
    for suffix in (".gguf", ".bin"):
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
    return name


def run(args) -> int:
    try:
        import fastapi, sse_starlette, uvicorn  # noqa: F401,E401
    except ImportError as exc:
        print(f"ggml-backend serve needs the server extra: pip install 'ggml-backend[server]' ({exc})",
              file=sys.stderr)
        return 1
    if not args.ray and (args.replicas is not None or args.autoscale is not None or args.ray_address is not None):
        raise ValueError("--replicas, --autoscale and --ray-address need --ray")
    if args.ray:
        from ..server.ray_serve import parse_autoscale
        if args.replicas is not None and args.autoscale is not None:
            raise ValueError("give --replicas or --autoscale, not both")
        if args.replicas is not None and args.replicas < 1:
            raise ValueError(f"--replicas must be a positive integer, got {args.replicas}")
        autoscale = parse_autoscale(args.autoscale) if args.autoscale is not None else None
        if args.threads is None:
            args.threads = 1
    config, generated = build_config(args)
    if config.models[0].path is None:   # assemble the default model now, with progress, not in the first request
        from ..default_model import default_model_path
        config.models[0].path = default_model_path(progress=True)
    if generated:
        print(f"ggml-backend serve: listening on {args.host}, reachable from other machines; API key (send as "
              f"'Authorization: Bearer KEY'): {config.api_key}", file=sys.stderr)
    names = ", ".join(m.alias for m in config.models)
    print(f"ggml-backend serve: http://{args.host}:{args.port} (OpenAI /v1, KoboldCpp /api, llama.cpp server); "
          f"models: {names}", file=sys.stderr)
    if args.ray:
        return _run_on_ray(args, config, autoscale)
    from ..server import serve
    serve(config)
    return 0


def _run_on_ray(args, config, autoscale) -> int:
    """Deploy on Ray Serve and wait for Ctrl-C / SIGTERM; then the application is deleted (and a Ray started
    here stopped)."""
    import signal
    import threading
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray Serve: pip install 'ggml-backend[ray]' ({exc})") from None
    from ..server.ray_serve import APP_NAME, application
    for model in config.models:   # the path each replica opens: the same on every node
        model.path = os.path.abspath(model.path)
    app = application(config, replicas=args.replicas, autoscale=autoscale, cpus_per_replica=args.threads)
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"ggml-backend serve: Ray Serve application {APP_NAME!r} running "
              f"({f'{autoscale[0]} to {autoscale[1]}' if autoscale else args.replicas or 1} replicas, "
              f"{args.threads} thread(s) each); Ctrl-C stops it", file=sys.stderr)
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.delete(APP_NAME)
            if args.ray_address is None:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
