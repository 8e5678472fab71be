"""The ASGI app: one process, one engine, three dialects (OpenAI ``/v1``, KoboldCpp ``/api``, llama.cpp's server).

Around the routes: an API key check on every route but ``/health`` (``Authorization: Bearer KEY``, or
``X-API-Key: KEY`` as KoboldCpp's clients send it), a bound on request bodies, CORS only for the origins given,
and errors in each dialect's own shape. No route serves files (FastAPI's docs pages are off).
"""
from __future__ import annotations

import hmac
import sys
import time
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from .config import ServerConfig
from .errors import APIError, error_response
from .slots import ClientGone, ModelRegistry

#: routes anyone may call without the API key (load balancers and UIs probe them before logging in)
OPEN_ROUTES = ("/health",)


def create_app(config: ServerConfig, loader=None) -> FastAPI:
    """The server's app; ``loader(model_config) -> Llama`` replaces how models are loaded (tests)."""
    config.check()
    registry = ModelRegistry(config.models, config.queue_limit, loader)

    @asynccontextmanager
    async def lifespan(app):
        yield
        registry.close()   # shutdown: every generation ends (after its token in progress), the line empties

    app = FastAPI(title="ggml_backend", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.state.config = config
    app.state.started = time.time()

    from . import kobold, llamacpp, openai
    app.include_router(openai.router)
    app.include_router(kobold.router)
    app.include_router(llamacpp.router)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(APIError(400, "; ".join(parts) or "invalid request"), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                           str(exc.detail))
        return error_response(APIError(exc.status_code, message), request.url.path)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)   # nobody reads it; nginx's code for "client closed the request"

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        print(f"ggml-backend serve: error in {request.method} {request.url.path}:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"), request.url.path)

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyCheck, api_key=config.api_key)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"])
    return app


class APIKeyCheck:
    """401 for a request without the key, on every route but OPEN_ROUTES (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if not hmac.compare_digest(given, self.key):
            error = APIError(401, "a valid API key is required (Authorization: Bearer KEY, or X-API-Key: KEY)",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error_response(error, scope["path"])(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over ``max_bytes``, whether it says its length or streams it in chunks."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is larger than {self.max_bytes:,} bytes", code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(too_big, scope["path"])(scope, receive, send)
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise APIError(413, too_big.message, code="body_too_large")
            return message
        return await self.app(scope, bounded_receive, send)
