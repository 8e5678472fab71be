"""Errors a request can get, each written in the shape its dialect's clients read.

* OpenAI (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``;
* KoboldCpp (``/api/...``): ``{"detail": {"msg", "type"}}``, as KoboldCpp answers;
* llama.cpp's server (everything else): ``{"error": {"code": <status>, "message", "type"}}``.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

#: the longest message an error quotes back (a field can hold megabytes)
MAX_MESSAGE_CHARS = 500

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                   501: "not_supported_error", 503: "unavailable_error"}


class APIError(Exception):
    """An error with its HTTP status; ``param``/``code`` as OpenAI's API names them."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = short(message)
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPE_BY_STATUS.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")


class ServerBusy(APIError):
    """Every slot is busy and the queue is full: come back later."""

    def __init__(self, queue_limit: int, retry_after_s: int = 1):
        super().__init__(503, f"the server is busy: every slot is in use and {queue_limit} requests are waiting; "
                              f"retry after {retry_after_s} s", code="server_busy",
                         headers={"Retry-After": str(retry_after_s)})


def short(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text):,} characters, cut]"


def dialect_of(path: str) -> str:
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path.startswith("/api/"):
        return "kobold"
    return "llamacpp"


def error_body(error: APIError, dialect: str) -> dict:
    if dialect == "openai":
        return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    if dialect == "kobold":
        return {"detail": {"msg": error.message, "type": error.code or error.type}}
    return {"error": {"code": error.status, "message": error.message, "type": error.type}}


def error_response(error: APIError, path: str) -> JSONResponse:
    return JSONResponse(error_body(error, dialect_of(path)), status_code=error.status, headers=error.headers)
