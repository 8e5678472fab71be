"""The one exception family for bad model files and bad input.

Every problem found while reading a file raises ``ModelFileError`` (a ``ValueError``), with a message that names
the file, what is wrong and the byte offset where it was found.
"""
from __future__ import annotations


class ModelFileError(ValueError):
    """A model file is truncated, corrupt, of an unsupported version, or otherwise unusable."""

    def __init__(self, path, problem: str, offset: int | None = None):
        self.path = str(path) if path is not None else "<memory>"
        self.problem = problem
        self.offset = offset
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: {problem}{where}")


class UnsupportedVersionError(ModelFileError):
    """A recognised container whose version (or quantization layout of that version) cannot be read."""


class UnknownTypeError(ModelFileError):
    """A tensor uses a ggml type id that this engine does not know."""


class BadMagicError(ModelFileError):
    """The file does not start with a GGUF or GGML magic: it is not a model file this engine knows."""


class TruncatedFileError(ModelFileError):
    """The file ends before a structure that its header announces."""


class CorruptFileError(ModelFileError):
    """A header field holds an impossible value: an absurd count or length, a bad dimension, a duplicate name,
    tensor data outside the file, a misaligned offset, an unknown metadata value type."""
