"""What the web UI needs when other machines can reach it: a login, bounded uploads of template files only, and
error messages of bounded length.

Anyone who can open the page can generate, load models from the model directory and write templates, so
``--listen`` and ``--share`` never run without a login: ``--auth user:pass``, or a generated password printed at
start. Gradio accepts uploads (``/gradio_api/upload``) from every client whatever the page shows and serves them
back; ``UploadGuard`` lets through only template, character and chat files (YAML, JSON) up to
``MAX_UPLOAD_BYTES`` and pictures (PNG character cards, PNG/JPEG pictures) up to ``MAX_PICTURE_UPLOAD_BYTES``.
"""
from __future__ import annotations

import re
import secrets

#: the largest upload request of a text file (one template, character or chat file and the multipart framing)
MAX_UPLOAD_BYTES = 256 * 1024
#: the largest upload request of a picture (a PNG character card or a JPEG, 8 MiB, and the framing)
MAX_PICTURE_UPLOAD_BYTES = 8 * 1024 * 1024 + 64 * 1024
#: text files a client may upload: instruction templates, characters (text-generation-webui's YAML/JSON), chats
TEXT_SUFFIXES = (".yaml", ".yml", ".json")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
UPLOAD_SUFFIXES = TEXT_SUFFIXES + PICTURE_SUFFIXES
#: each kind's request limit
UPLOAD_LIMITS = {**{s: MAX_UPLOAD_BYTES for s in TEXT_SUFFIXES},
                 **{s: MAX_PICTURE_UPLOAD_BYTES for s in PICTURE_SUFFIXES}}
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
    """ASGI middleware in front of Gradio's upload route: every file named in a request must end in one of
    ``limits``' suffixes, and the request may be as large as the smallest limit of its files' kinds (YAML/JSON
    MAX_UPLOAD_BYTES, pictures MAX_PICTURE_UPLOAD_BYTES); anything else is refused before Gradio stores it."""

    def __init__(self, app, limits: dict | None = None):
        self.app = app
        self.limits = {s.lower(): int(n) for s, n in (limits or UPLOAD_LIMITS).items()}
        self.suffixes = tuple(self.limits)
        self.max_bytes = max(self.limits.values())

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
            await _refuse(send, 415, "only template, character, chat and picture files can be uploaded ("
                          + ", ".join(self.suffixes) + ")")
            return
        limit = min(n for suffix, n in self.limits.items() for name in names if name.lower().endswith(suffix))
        if len(body) > limit:
            await _refuse(send, 413, f"uploads of these files are limited to {limit:,} bytes")
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
