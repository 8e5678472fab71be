"""Characters: text-generation-webui's ``characters/<name>.yaml`` (``name``, ``greeting``, ``context``, a picture
``<name>.png``/``.jpg`` beside it) and TavernAI / SillyTavern cards (V1 JSON, V2/V3 ``chara_card_v2``/``v3`` JSON,
and PNG pictures carrying the card as base64 JSON in a ``chara`` (or ``ccv3``) text chunk).

``load_character(path)`` reads any of them into a ``CharacterCard`` (name, greeting, context, picture). A card's
context is written as text-generation-webui writes it when it imports one: ``{name}'s Persona: {description}``,
``Scenario: {scenario}``, then the example messages; its ``first_mes`` is the greeting. (textgen leaves
``personality`` and ``system_prompt`` out, and so does this.)

Cards come from strangers, so every step is bounded and fails with a message naming what is wrong: files over
MAX_CARD_FILE_BYTES / MAX_CARD_PNG_BYTES, a PNG that is not one (signature, chunk lengths, CRCs), more than
MAX_PNG_CHUNKS chunks, text chunks over MAX_TEXT_CHUNK_BYTES (compressed ones are inflated to that much at
most), bad base64, text that is not UTF-8, JSON or YAML that does not parse or nests too deep, fields that are
not strings, and fields over MAX_CARD_FIELD_CHARS. Only text chunks are read: image data is never decoded.
"""
from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ggml_backend.templates import TemplateError

from .chat_modes import Character
from .user_data import atomic_write, inside, read_bounded, safe_name

#: a YAML or JSON character file (real ones are a few KiB)
MAX_CARD_FILE_BYTES = 256 * 1024
#: a PNG card or a character/user picture (cards are pictures of a few hundred KiB to a few MiB)
MAX_CARD_PNG_BYTES = 8 * 1024 * 1024
#: one PNG text chunk, before or after inflating
MAX_TEXT_CHUNK_BYTES = 1024 * 1024
MAX_PNG_CHUNKS = 4096
#: the longest name, greeting, context (or card field) kept
MAX_CARD_FIELD_CHARS = 32_768
CARD_SUFFIXES = (".yaml", ".yml", ".json", ".png")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"


@dataclass(frozen=True)
class CharacterCard(Character):
    """A character with its picture (PNG or JPEG bytes, or None)."""
    picture: bytes | None = None

    @property
    def picture_suffix(self) -> str | None:
        if self.picture is None:
            return None
        return ".png" if self.picture.startswith(PNG_SIGNATURE) else ".jpg"


class CardError(ValueError):
    """A character file that cannot be read; the message names the file and the fault."""


# ---- PNG text chunks ---------------------------------------------------------------------------------------------

def png_text_chunks(data: bytes, where: str = "the file") -> dict[str, bytes]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG as {keyword: text bytes}, read without decoding the image.

    Checks the signature, that every chunk lies inside the file with a correct CRC, and the bounds above; stops
    at IEND. tEXt/zTXt text is Latin-1 by the PNG standard, iTXt text UTF-8: both are returned as bytes."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError(f"{where} is not a PNG picture (its first bytes are not the PNG signature)")
    chunks: dict[str, bytes] = {}
    pos, count = len(PNG_SIGNATURE), 0
    while True:
        if pos + 8 > len(data):
            raise CardError(f"{where}: the PNG ends in the middle of a chunk header (no IEND)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise CardError(f"{where}: a PNG chunk of {length:,} bytes runs past the end of the file")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:end])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise CardError(f"{where}: PNG chunk {kind!r} has a wrong CRC (the file is damaged)")
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise CardError(f"{where}: more than {MAX_PNG_CHUNKS:,} PNG chunks")
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text_chunk(kind, body, where)
            chunks.setdefault(keyword, text)
        elif kind == b"IEND":
            return chunks
        pos = end


def _text_chunk(kind: bytes, body: bytes, where: str) -> tuple[str, bytes]:
    keyword, sep, rest = body.partition(b"\0")
    if not sep or not 1 <= len(keyword) <= 79:
        raise CardError(f"{where}: a PNG {kind.decode()} chunk without a keyword")
    name = keyword.decode("latin-1")
    if kind == b"tEXt":
        text = rest
    elif kind == b"zTXt":
        if rest[:1] != b"\0":
            raise CardError(f"{where}: PNG zTXt chunk {name!r} has an unknown compression method")
        text = _inflate(rest[1:], where, name)
    else:   # iTXt: compression flag, method, language tag \0, translated keyword \0, text
        if len(rest) < 2:
            raise CardError(f"{where}: PNG iTXt chunk {name!r} is cut short")
        compressed, method, tail = rest[0], rest[1], rest[2:]
        _, sep1, tail = tail.partition(b"\0")
        _, sep2, text = tail.partition(b"\0")
        if not (sep1 and sep2):
            raise CardError(f"{where}: PNG iTXt chunk {name!r} is cut short")
        if compressed:
            if method != 0:
                raise CardError(f"{where}: PNG iTXt chunk {name!r} has an unknown compression method")
            text = _inflate(text, where, name)
    if len(text) > MAX_TEXT_CHUNK_BYTES:
        raise CardError(f"{where}: PNG text chunk {name!r} is over {MAX_TEXT_CHUNK_BYTES:,} bytes")
    return name, text


def _inflate(data: bytes, where: str, name: str) -> bytes:
    """zlib data inflated to at most MAX_TEXT_CHUNK_BYTES (a small chunk may inflate to gigabytes)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES + 1)
    except zlib.error as exc:
        raise CardError(f"{where}: PNG text chunk {name!r} does not inflate ({exc})") from None
    if len(out) > MAX_TEXT_CHUNK_BYTES:
        raise CardError(f"{where}: PNG text chunk {name!r} inflates to over {MAX_TEXT_CHUNK_BYTES:,} bytes")
    return out


# ---- cards -------------------------------------------------------------------------------------------------------

def card_from_png(data: bytes, where: str = "the PNG") -> dict:
    """The card mapping inside a PNG's ``chara`` (else ``ccv3``) text chunk."""
    chunks = png_text_chunks(data, where)
    raw = chunks.get("chara") or chunks.get("ccv3")
    if raw is None:
        raise CardError(f"{where} is a PNG without a character card (no 'chara' text chunk)")
    try:
        decoded = base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CardError(f"{where}: the card in the 'chara' chunk is not valid base64") from None
    return _parse_json(decoded, f"{where}'s card")


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"{where} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") \
            from None


def _parse_json(data: bytes, where: str) -> dict:
    text = _decode_utf8(data, where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise CardError(f"{where}: the JSON nests too deep") from None
    if not isinstance(value, dict):
        raise CardError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _field(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CardError(f"{where}: the field {key!r} must be text, got {type(value).__name__}")
    value = str(value)
    if len(value) > MAX_CARD_FIELD_CHARS:
        raise CardError(f"{where}: the field {key!r} is {len(value):,} characters; the limit is "
                        f"{MAX_CARD_FIELD_CHARS:,}")
    return value


def is_tavern_card(data: dict) -> bool:
    return data.get("spec") in ("chara_card_v2", "chara_card_v3") or "first_mes" in data or (
        isinstance(data.get("data"), dict) and "first_mes" in data["data"])


def card_from_mapping(data: dict, where: str = "the card") -> CharacterCard:
    """A character from a textgen YAML/JSON mapping, a Pygmalion JSON, or a TavernAI V1 / V2 / V3 card."""
    if not isinstance(data, dict):
        raise CardError(f"{where}: expected a mapping, got {type(data).__name__}")
    if is_tavern_card(data):
        if isinstance(data.get("data"), dict):
            data = data["data"]
        # textgen's upload_tavern_character: the card as a Pygmalion-style character
        data = {"char_name": _field(data, "name", where), "char_persona": _field(data, "description", where),
                "char_greeting": _field(data, "first_mes", where),
                "example_dialogue": _field(data, "mes_example", where),
                "world_scenario": _field(data, "scenario", where)}
    else:
        keys = ("name", "bot", "<|bot|>", "char_name", "your_name", "user", "<|user|>", "context", "char_persona",
                "world_scenario", "example_dialogue", "greeting", "char_greeting")
        data = {k: _field(data, k, where) for k in keys if k in data}
    try:
        character = Character.from_dict(data)
    except TemplateError as exc:
        raise CardError(f"{where}: {exc}") from None
    if not character.name.strip():
        raise CardError(f"{where} has no name")
    for key in ("name", "context", "greeting"):
        if len(getattr(character, key)) > MAX_CARD_FIELD_CHARS:
            raise CardError(f"{where}: the {key} it makes is over {MAX_CARD_FIELD_CHARS:,} characters")
    return CharacterCard(name=character.name.strip(), context=character.context, greeting=character.greeting,
                         user_name=character.user_name)


def load_character(path) -> CharacterCard:
    """A character from a YAML, JSON or PNG file: name, greeting, context and picture (a PNG card is its own
    picture; a YAML/JSON file's picture is ``<stem>.png``/``.jpg``/``.jpeg`` beside it, if any).
    Raises CardError (a ValueError) naming the file and the fault."""
    path = Path(path)
    suffix = path.suffix.lower()
    where = path.name
    if suffix not in CARD_SUFFIXES:
        raise CardError(f"{where}: a character is a .yaml, .yml, .json or .png file")
    limit = MAX_CARD_PNG_BYTES if suffix == ".png" else MAX_CARD_FILE_BYTES
    try:
        data = read_bounded(path, limit, f"character file {where}")
    except OSError as exc:
        raise CardError(f"cannot read the character file {where}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CardError(str(exc)) from None
    if suffix == ".png":
        return replace(card_from_mapping(card_from_png(data, where), where), picture=data)
    if suffix == ".json":
        mapping = _parse_json(data, where)
    else:
        text = _decode_utf8(data, where)
        try:
            mapping = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CardError(f"{where} is not valid YAML: {str(exc)[:300]}") from None
        except RecursionError:
            raise CardError(f"{where}: the YAML nests too deep") from None
    card = card_from_mapping(mapping, where)
    return replace(card, picture=_picture_beside(path))


def _picture_beside(path: Path) -> bytes | None:
    for suffix in PICTURE_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            try:
                return check_picture(read_bounded(candidate, MAX_CARD_PNG_BYTES, f"picture {candidate.name}"),
                                     candidate.name)
            except (OSError, ValueError):
                return None   # a character without its picture is still the character
    return None


def check_picture(data: bytes, where: str = "the picture") -> bytes:
    """``data`` if it starts as a PNG or JPEG file does (the browser decodes it, never this process)."""
    if len(data) > MAX_CARD_PNG_BYTES:
        raise CardError(f"{where} is over {MAX_CARD_PNG_BYTES:,} bytes")
    if not (data.startswith(PNG_SIGNATURE) or data.startswith(_JPEG_SIGNATURE)):
        raise CardError(f"{where} is not a PNG or JPEG picture")
    return data


# ---- the characters/ folder --------------------------------------------------------------------------------------

def character_names(folder) -> list[str]:
    """The characters in ``folder``: YAML/JSON files, and PNG files that are not the picture of one of those."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    texts = {p.stem for p in files if p.suffix.lower() in (".yaml", ".yml", ".json")}
    pngs = {p.stem for p in files if p.suffix.lower() == ".png"}
    return sorted(texts | pngs, key=str.casefold)


def character_path(folder, name: str) -> Path:
    """The file of the character ``name`` in ``folder`` (YAML, then JSON, then PNG)."""
    folder = Path(folder)
    stem = safe_name(name, "character name")
    for suffix in (".yaml", ".yml", ".json", ".png"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return inside(folder, path)
    raise CardError(f"no character named {name!r} in {folder.name}/")


def load_named(folder, name: str) -> CharacterCard:
    return load_character(character_path(folder, name))


def save_character(folder, card: Character, picture: bytes | None = None, overwrite: bool = False) -> Path:
    """Write ``card`` as ``<name>.yaml`` (textgen's fields) in ``folder``, and its picture as ``<name>.png``/
    ``.jpg`` beside it; an existing character of that name is replaced only with ``overwrite``."""
    folder = Path(folder)
    stem = safe_name(card.name, "character name")
    path = inside(folder, folder / f"{stem}.yaml")
    existing = [p for p in (folder / f"{stem}{s}" for s in (".yaml", ".yml", ".json", ".png")) if p.exists()]
    if existing and not overwrite:
        raise CardError(f"a character named {stem!r} exists already: tick Overwrite to replace it")
    for key in ("name", "context", "greeting"):
        if len(getattr(card, key)) > MAX_CARD_FIELD_CHARS:
            raise CardError(f"the character's {key} is over {MAX_CARD_FIELD_CHARS:,} characters")
    picture = picture if picture is not None else getattr(card, "picture", None)
    fields = {"name": card.name, "greeting": card.greeting, "context": card.context}
    text = yaml.dump(fields, Dumper=_BlockDumper, allow_unicode=True, sort_keys=False, width=1_000_000)
    picture_path = None
    if picture is not None:   # the picture first: the YAML file appearing means the character is complete
        picture = check_picture(picture)
        picture_path = folder / f"{stem}{'.png' if picture.startswith(PNG_SIGNATURE) else '.jpg'}"
        atomic_write(picture_path, picture)
    atomic_write(path, text.encode("utf-8"))
    for old in existing:   # the YAML file is the character now; a stale card file of the same name would shadow it
        if old.suffix.lower() in (".yml", ".json", ".png") and old not in (path, picture_path):
            old.unlink()
    return path


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, as text-generation-webui's character files are written."""


_BlockDumper.add_representer(
    str, lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:str", data,
                                                      style="|" if "\n" in data else None))
