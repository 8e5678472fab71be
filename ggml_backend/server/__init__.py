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
    import asyncio

    import uvicorn

    app = create_app(config)

    class DrainingServer(uvicorn.Server):
        """On SIGINT/SIGTERM, before uvicorn waits for the connections: every generation is ended (after its token
        in progress) and the line refused, so streams end with their [DONE] and nothing waits for the timeout."""

        def handle_exit(self, sig, frame):
            loop = getattr(self, "_loop", None)
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(app.state.registry.close)
            super().handle_exit(sig, frame)

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

    DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                  timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)).run()


#: how long a shutdown waits for requests in flight before closing their connections
GRACEFUL_SHUTDOWN_S = 10
