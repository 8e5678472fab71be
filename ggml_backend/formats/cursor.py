"""A bounds-checked reader over the bytes of a memory-mapped file.

Every read first checks that the bytes it needs are there, so a corrupt count or length becomes a
``TruncatedFileError`` / ``CorruptFileError`` naming the file and offset, never a giant allocation or a read past
the mapping.
"""
from __future__ import annotations

import struct

from .errors import CorruptFileError, TruncatedFileError

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Cursor:
    def __init__(self, path, view: memoryview, pos: int = 0):
        self.path = path
        self.view = view          # memoryview of the whole file (format "B")
        self.size = len(view)
        self.pos = pos

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.size - self.pos:
            raise TruncatedFileError(
                self.path, f"{what} needs {n_bytes} bytes but the file ends after {self.size - self.pos} more "
                f"(file size {self.size})", self.pos)

    def check_count(self, count: int, min_item_bytes: int, what: str) -> None:
        """Refuse a count that could not fit in the rest of the file even if every item took its minimum size."""
        if count * min_item_bytes > self.size - self.pos:
            raise CorruptFileError(
                self.path, f"{what} count {count} cannot fit in the {self.size - self.pos} bytes left in the file "
                f"(each needs at least {min_item_bytes} bytes)", self.pos)

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.view, self.pos)
        self.pos += fmt.size
        return values

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.view, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.view, self.pos)
        self.pos += 8
        return value

    def raw(self, n_bytes: int, what: str) -> bytes:
        self.need(n_bytes, what)
        data = bytes(self.view[self.pos:self.pos + n_bytes])
        self.pos += n_bytes
        return data

    def skip_to(self, pos: int, what: str) -> None:
        if pos > self.size:
            raise TruncatedFileError(self.path, f"{what} at {pos} lies past the end of the file (size {self.size})",
                                     self.pos)
        self.pos = pos


def decode_text(data) -> str:
    """Bytes of a name or token as str; bytes that are not UTF-8 survive as surrogates (``surrogateescape``),
    so ``text.encode('utf-8', 'surrogateescape')`` gives back exactly the stored bytes."""
    return str(data, "utf-8", "surrogateescape")


def encode_text(text) -> bytes:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    return str(text).encode("utf-8", "surrogateescape")
