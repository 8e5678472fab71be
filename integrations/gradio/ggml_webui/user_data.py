"""The web UI's user data folder (characters, presets, past chats) and the two things every store in it needs:
file names that cannot leave it, and writes that a crash cannot leave half done.

The folder is ``$GGML_BACKEND_WEBUI_DIR``, else ``~/.local/share/ggml_backend/webui``; ``build_app(user_data_dir=)``
and ``ggml-backend webui --user-data-dir`` choose another. Inside, text-generation-webui's layout:
``characters/``, ``presets/``, ``logs/chat/<character>/<timestamp>.json``, ``logs/instruct/<timestamp>.json``.
"""
from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from pathlib import Path

ENV_VAR = "GGML_BACKEND_WEBUI_DIR"
#: the longest file name stem written here (names come from cards and users)
MAX_NAME_CHARS = 64
_UNSAFE = re.compile(r"[^\w .,'()+\-]")


def default_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".local" / "share" / "ggml_backend" / "webui")


def safe_name(name, what: str = "name") -> str:
    """``name`` as a file name stem: NFC, characters other than letters, digits, spaces and ``.,'()+-_`` become
    ``_``, whitespace runs one space, at most MAX_NAME_CHARS, no leading dot. A name with nothing left is refused
    (ValueError naming ``what``), never turned into a path of its own."""
    text = " ".join(unicodedata.normalize("NFC", str(name or "")).split())
    text = _UNSAFE.sub("_", text)[:MAX_NAME_CHARS].strip().lstrip(".").strip()
    if not text or not text.strip("_"):
        from .security import short
        raise ValueError(f"the {what} {short(repr(str(name)), 80)} has no usable characters for a file name")
    return text


def inside(folder: Path, path: Path) -> Path:
    """``path`` resolved, refused unless it lies in ``folder`` (a last check after safe_name)."""
    folder, resolved = Path(folder).resolve(), Path(path).resolve()
    if resolved != folder and folder not in resolved.parents:
        raise ValueError(f"{path} is outside {folder}")
    return resolved


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed to disk, then renamed over
    it: a crash at any point leaves the old file or the new one, never a part of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:   # the rename itself survives a power cut only once the folder's entry is on disk
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_bounded(path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refused (ValueError) past ``limit`` without reading more than ``limit + 1``."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the {what} is over {limit:,} bytes")
    return data
