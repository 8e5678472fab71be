"""What the web UI needs when other machines can reach it: a login, bounded uploads of template files only, and
error messages of bounded length.

Anyone who can open the page can generate, load models from the model directory and write templates, so
``--listen`` and ``--share`` never run without a login: ``--auth user:pass``, or a generated password printed at
start. Gradio accepts uploads (``/gradio_api/upload``) from every client whatever the page shows and serves them
back; ``UploadGuard`` lets through only template and character files (YAML, JSON) up to ``MAX_UPLOAD_BYTES``.
"""
from __future__ import annotations

import re
import secrets

#: the largest upload request (one template file and the multipart framing around it)
MAX_UPLOAD_BYTES = 256 * 1024
#: the file types a client may upload: instruction templates and character cards (text-generation-webui's YAML/JSON)
UPLOAD_SUFFIXES = (".yaml", ".yml", ".json")
#: the longest error text shown on the page or written to the log (a field can hold megabytes)
MAX_ERROR_CHARS = 500
DEFAULT_USER = "ggml"


def short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: errors can quote a user's whole field."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text):,} characters, cut]"


def parse_auth(value: str) -> tuple[str, str]:
    """``user:password`` (the password may contain ':') as a (user, password) pair."""
    user, sep, password = (value or "").partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError("--auth must be USER:PASSWORD with both parts non-empty")
    return user.strip(), password


def resolve_auth(auth, listen: bool, share: bool) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(Gradio's ``auth`` list or None, a generated password to print or None).

    ``auth`` is None, "user:pass", a (user, pass) pair or a list of pairs. Served beyond this machine (listen or
    share) without one, a login is made up: user ``ggml`` and a random password."""
    if auth is None:
        if not (listen or share):
            return None, None
        password = secrets.token_urlsafe(12)
        return [(DEFAULT_USER, password)], password
    if isinstance(auth, str):
        return [parse_auth(auth)], None
    if isinstance(auth, tuple):
        return [auth], None
    return list(auth), None


_FILENAME = re.compile(rb'filename\*?\s*=\s*(?:"([^"\r\n]*)"|([^;\r\n]*))', re.IGNORECASE)


class UploadGuard:
    """ASGI middleware in front of Gradio's upload route: at most ``max_bytes`` per request, and every file named
    in it must end in one of ``suffixes``; anything else is refused before Gradio stores it."""

    def __init__(self, app, max_bytes: int = MAX_UPLOAD_BYTES, suffixes=UPLOAD_SUFFIXES):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.suffixes = tuple(s.lower() for s in suffixes)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" \
                or not scope.get("path", "").rstrip("/").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _refuse(send, 413, f"uploads are limited to {self.max_bytes:,} bytes")
            return
        body = bytearray()
        while True:   # read it all (bounded), to see every part's file name before Gradio stores anything
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _refuse(send, 413, f"uploads are limited to {self.max_bytes:,} bytes")
                return
            if not message.get("more_body", False):
                break
        names = [(quoted or bare).strip().decode("utf-8", "replace") for quoted, bare in _FILENAME.findall(body)]
        if not names or not all(name.lower().endswith(self.suffixes) for name in names):
            await _refuse(send, 415, "only template and character files can be uploaded (" + ", ".join(self.suffixes) + ")")
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


async def _refuse(send, status: int, text: str) -> None:
    payload = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
