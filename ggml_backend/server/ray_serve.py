"""``ggml-backend serve --ray``: the same server app deployed as a Ray Serve application.

Each replica builds the app with ``create_app`` (the same routes, dialects, API key check, body limit and error
shapes as ``ggml-backend serve``; Ray Serve's ``@serve.ingress`` with the app built in the replica, not a second
implementation) and loads its models at start, each file memory-mapped: replicas on one machine share the weights'
pages. Ray Serve's proxy spreads requests over the replicas, queues what they cannot take and, with autoscaling,
adds or removes replicas on the number of requests in flight; a replica that dies is replaced while the others
keep answering.

A replica takes at most as many requests at once as it has slots (``max_ongoing_requests``); the rest wait in Ray
Serve's router, not in the replica, so a replica that dies loses only the requests it was generating.

``build_app(args)`` is an application builder for ``serve run`` / ``serve deploy`` / KubeRay's RayService (see
``examples/ray/serve.yaml``); ``application(config, ...)`` is what the CLI deploys.
"""
from __future__ import annotations

import dataclasses
import os

from ray import serve

from .app import create_app
from .config import ModelConfig, ServerConfig

#: the application's name in Ray Serve
APP_NAME = "ggml-backend"
#: seconds between Ray Serve's health checks of a replica (its default is 10; a dead one is replaced sooner)
HEALTH_CHECK_PERIOD_S = 5
#: what an application builder's ``args`` may hold (serve.yaml's ``args:``)
BUILDER_ARGS = {"model", "alias", "models", "n_ctx", "n_parallel", "threads", "chat_template", "api_key",
                "max_body", "queue_limit", "replicas", "autoscale", "cache_type_k", "cache_type_v", "use_mmap",
                "draft_max"}


@serve.ingress()
class GGMLServer:
    """One replica: the server app on its own models (loaded before the replica is marked ready)."""

    def __init__(self, config: dict):
        self.config = config_from_dict(config)
        if self.config.api_key is None:   # a secret is better given to the replicas' environment than in args
            self.config.api_key = os.environ.get("GGML_BACKEND_API_KEY") or None

    async def __serve_build_asgi_app__(self):
        app = create_app(self.config)
        for alias in app.state.registry.configs:   # load now: the first request must not pay for it
            await app.state.registry.pool(alias)
        self.app_ = app
        return app

    async def check_health(self):
        """Ray Serve asks every HEALTH_CHECK_PERIOD_S; a replica whose models were closed is replaced."""
        app = getattr(self, "app_", None)
        if app is not None and any(pool.closing for pool in app.state.registry.pools.values()):
            raise RuntimeError("the replica's models are closed")


def config_to_dict(config: ServerConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> ServerConfig:
    fields = dict(data)
    fields["models"] = [ModelConfig(**m) for m in fields["models"]]
    config = ServerConfig(**fields)
    config.check()
    return config


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` replicas (MIN may be 0: Ray Serve starts one when a request comes)."""
    try:
        low, high = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {text!r}") from None
    if low < 0 or high < 1 or low > high:
        raise ValueError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def deployment_options(config: ServerConfig, *, replicas: int | None = None,
                       autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1) -> dict:
    """Ray Serve's options for the deployment: fixed replicas or autoscaling on requests in flight (one replica
    per ``slots`` requests in flight), each replica asking Ray for ``cpus_per_replica`` CPUs."""
    if replicas is not None and autoscale is not None:
        raise ValueError("give --replicas or --autoscale, not both")
    slots = sum(m.n_parallel for m in config.models)
    options = {"ray_actor_options": {"num_cpus": cpus_per_replica}, "max_ongoing_requests": slots,
               "health_check_period_s": HEALTH_CHECK_PERIOD_S, "graceful_shutdown_timeout_s": 10}
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "initial_replicas": max(low, 1), "max_replicas": high,
                                         "target_ongoing_requests": slots, "upscale_delay_s": 5,
                                         "downscale_delay_s": 60}
    else:
        replicas = 1 if replicas is None else replicas
        if replicas < 1:
            raise ValueError(f"--replicas must be a positive integer, got {replicas}")
        options["num_replicas"] = replicas
    return options


def application(config: ServerConfig, *, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
                cpus_per_replica: float = 1):
    """The bound application (``serve.run(application(...), name=APP_NAME, route_prefix="/")``)."""
    config.check()
    options = deployment_options(config, replicas=replicas, autoscale=autoscale, cpus_per_replica=cpus_per_replica)
    return serve.deployment(GGMLServer, name="GGMLServer").options(**options).bind(config_to_dict(config))


def build_app(args: dict):
    """Application builder for ``serve run`` and serve.yaml: ``args`` as in BUILDER_ARGS (``model`` a file path
    on every node, none for the default model, or ``models`` a models YAML file; ``api_key``, or
    $GGML_BACKEND_API_KEY in the replicas' environment; ``replicas`` N or ``autoscale`` "MIN:MAX"; ``threads`` per
    replica, also its CPUs)."""
    from .config import DEFAULT_MAX_BODY_BYTES, DEFAULT_N_CTX, DEFAULT_N_PARALLEL, DEFAULT_QUEUE_LIMIT, \
        load_models_file
    args = dict(args or {})
    unknown = set(args) - BUILDER_ARGS
    if unknown:
        raise TypeError(f"unknown ggml-backend application args: {', '.join(sorted(unknown))} "
                        f"(known: {', '.join(sorted(BUILDER_ARGS))})")
    threads = int(args.get("threads", 1))
    defaults = ModelConfig(alias=args.get("alias") or "default", path=args.get("model"),
                           n_ctx=int(args.get("n_ctx", DEFAULT_N_CTX)),
                           n_parallel=int(args.get("n_parallel", DEFAULT_N_PARALLEL)),
                           chat_template=args.get("chat_template"), n_threads=threads,
                           cache_type_k=args.get("cache_type_k", "f16"), cache_type_v=args.get("cache_type_v", "f16"),
                           use_mmap=args.get("use_mmap", True), draft_max=args.get("draft_max", 0))
    if args.get("models"):
        models = load_models_file(args["models"], defaults)
    else:
        if not args.get("alias"):   # the file's name; no model: the default one, assembled on each replica's node
            from ..default_model import DEFAULT_MODEL_NAME
            defaults.alias = os.path.splitext(os.path.basename(defaults.path or DEFAULT_MODEL_NAME))[0]
        models = [defaults]
    config = ServerConfig(models=models, api_key=args.get("api_key"),
                          queue_limit=int(args.get("queue_limit", DEFAULT_QUEUE_LIMIT)),
                          max_body_bytes=int(args.get("max_body", DEFAULT_MAX_BODY_BYTES)))
    autoscale = parse_autoscale(args["autoscale"]) if args.get("autoscale") else None
    replicas = int(args["replicas"]) if "replicas" in args else None
    return application(config, replicas=replicas, autoscale=autoscale, cpus_per_replica=threads)
