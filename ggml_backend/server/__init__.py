"""``ggml-backend serve``: the HTTP server that existing web UIs and clients plug into.

One process, one engine, three dialects: OpenAI (``/v1/...``), KoboldCpp (``/api/v1/...``, ``/api/extra/...``)
and llama.cpp's server (``/completion``, ``/tokenize``, ``/health``, ``/metrics``...). FastAPI + uvicorn +
sse-starlette, as llama-cpp-python's server. ``create_app(ServerConfig(...))`` gives the ASGI app;
``serve(config)`` runs it.
"""
from .app import create_app
from .config import ModelConfig, ServerConfig, load_models_file

__all__ = ["create_app", "serve", "ModelConfig", "ServerConfig", "load_models_file"]


def serve(config: ServerConfig, *, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests then end cleanly (streams are closed after the
    token in progress) within ``GRACEFUL_SHUTDOWN_S``."""
    import uvicorn
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


#: how long a shutdown waits for requests in flight before closing their connections
GRACEFUL_SHUTDOWN_S = 10
