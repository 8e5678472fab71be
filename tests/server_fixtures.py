"""A real ``ggml-backend serve`` app on a loopback port, in a thread of the test process, for the server tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from ggml_backend.server import ModelConfig, ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(config: ServerConfig | None = None, **config_fields):
    """Yield (base_url, app) of a server on 127.0.0.1 (default: the default model as 'qwen', 2 slots of 2048
    tokens); it is shut down (gracefully, as on SIGTERM) on leaving."""
    if config is None:
        models = config_fields.pop("models", None) or [ModelConfig(alias="qwen", n_ctx=4096, n_parallel=2)]
        config = ServerConfig(models=models, port=free_port(), **config_fields)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}", app
    finally:
        server.should_exit = True
        thread.join(30)
