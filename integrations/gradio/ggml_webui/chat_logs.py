"""Past chats, saved as text-generation-webui saves them: ``logs/chat/<character>/<id>.json`` (chat and
chat-instruct modes) or ``logs/instruct/<id>.json`` (instruct mode), each ``{"internal": [...], "visible":
[...]}``: lists of ``[user message, bot reply]`` pairs, ``visible`` HTML-escaped as textgen shows them, a
greeting being the pair ``["<|BEGIN-VISIBLE-CHAT|>", greeting]`` in ``internal`` and ``["", greeting]`` in
``visible``. A new chat's id is its start time, ``YYYYMMDD-HH-MM-SS`` (textgen's); renaming changes the id.

Every save writes a temporary file and renames it over the old one (``user_data.atomic_write``), so a crash
mid-save leaves the chat as it was before. Names are made safe (``user_data.safe_name``) and checked to stay
inside the logs folder; files read back are bounded (MAX_CHAT_FILE_BYTES) and must have the shape above.
"""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path

from .chat_modes import BEGIN_VISIBLE_CHAT
from .user_data import atomic_write, inside, read_bounded, safe_name

#: the largest chat file read back or imported (a long chat is a few hundred KiB)
MAX_CHAT_FILE_BYTES = 8 * 1024 * 1024
#: the most [user, bot] pairs a chat file may hold
MAX_CHAT_ROWS = 10_000


def chat_folder(user_data: Path, mode: str, character: str) -> Path:
    """Where the chats of ``character`` (or of instruct mode) live."""
    logs = Path(user_data) / "logs"
    if mode == "instruct":
        return logs / "instruct"
    return logs / "chat" / safe_name(character or "AI", "character name")


def new_chat_id(folder: Path) -> str:
    """textgen's id, the time now (``-2``, ``-3``... when a chat of this second exists already), reserved by
    creating its file (empty) at once: two sessions starting a chat in the same second get two files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H-%M-%S")
    candidate, n = stamp, 1
    while True:
        try:
            fd = os.open(folder / f"{candidate}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            n += 1
            candidate = f"{stamp}-{n}"
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(to_file_data([])).encode("utf-8"))
        return candidate


def list_chats(folder: Path) -> list[str]:
    """The saved chats' ids, newest first (by modification time, as textgen lists them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix == ".json" and p.is_file() and not p.name.startswith(".")]
    return [p.stem for p in sorted(files, key=lambda p: (p.stat().st_mtime, p.stem), reverse=True)]


def chat_path(folder: Path, chat_id: str) -> Path:
    return inside(folder, Path(folder) / f"{safe_name(chat_id, 'chat name')}.json")


def to_file_data(history) -> dict:
    """The file's content for a history of [user, bot] pairs (greeting rows marked as textgen marks them)."""
    internal, visible = [], []
    for user, bot in history or []:
        user, bot = str(user), str(bot)
        internal.append([user, bot])
        visible.append(["" if user == BEGIN_VISIBLE_CHAT else html.escape(user), html.escape(bot)])
    return {"internal": internal, "visible": visible}


def from_file_data(data, where: str = "the chat file") -> list[list[str]]:
    """The history of a chat file's content (``internal``; textgen's older ``data`` key too), checked."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with 'internal' and 'visible', got {type(data).__name__}")
    rows = data.get("internal", data.get("data"))
    if not isinstance(rows, list):
        raise ValueError(f"{where}: no 'internal' list of [user message, bot reply] pairs")
    if len(rows) > MAX_CHAT_ROWS:
        raise ValueError(f"{where}: {len(rows):,} messages; the limit is {MAX_CHAT_ROWS:,}")
    history = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row)):
            raise ValueError(f"{where}: entry {i} of 'internal' is not a [user message, bot reply] pair of strings")
        history.append([row[0], row[1]])
    return history


def parse_chat(data: bytes, where: str = "the chat file") -> list[list[str]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{where}: the JSON nests too deep") from None
    return from_file_data(value, where)


def save_chat(folder: Path, chat_id: str, history) -> Path:
    """Write the chat (atomically: the previous version stays whole until the new one is complete)."""
    path = chat_path(folder, chat_id)
    atomic_write(path, json.dumps(to_file_data(history), indent=4, ensure_ascii=False).encode("utf-8"))
    return path


def load_chat(folder: Path, chat_id: str) -> list[list[str]]:
    path = chat_path(folder, chat_id)
    if not path.is_file():
        raise ValueError(f"no saved chat named {chat_id!r}")
    return parse_chat(read_bounded(path, MAX_CHAT_FILE_BYTES, f"chat file {path.name}"), path.name)


def rename_chat(folder: Path, old_id: str, new_name: str) -> str:
    """Rename a saved chat; refuses to replace another chat. Returns the new id."""
    source = chat_path(folder, old_id)
    if not source.is_file():
        raise ValueError(f"no saved chat named {old_id!r}")
    new_id = safe_name(new_name, "chat name")
    target = chat_path(folder, new_id)
    if target == source:
        return new_id
    if target.exists():
        raise ValueError(f"a chat named {new_id!r} exists already")
    source.rename(target)
    return new_id


def delete_chat(folder: Path, chat_id: str) -> None:
    path = chat_path(folder, chat_id)
    if not path.is_file():
        raise ValueError(f"no saved chat named {chat_id!r}")
    path.unlink()
