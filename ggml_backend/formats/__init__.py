"""Model files: GGUF (v2, v3) and legacy GGML (ggjt v1-v3, ggmf, ggml) readers and writers.

``load(path)`` opens either kind and returns a ``ModelFile`` whose tensors are read-only views into one
copy-on-write memmap (the loader may re-lay weights in place: quant/layouts.py; the file is never written) or, with
``in_memory=True``, into one copy of the file on huge pages (see resident.py).
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from .errors import (BadMagicError, CorruptFileError, ModelFileError, TruncatedFileError, UnknownTypeError,
                     UnsupportedVersionError)
from .ggml import GGML_MAGICS, read_ggml, write_ggml
from .gguf import GGUF_MAGIC, GGUFValueType, read_gguf, write_gguf
from .model_file import ModelFile, Tensor, Vocab, ggml_name_from_gguf, gguf_name_from_ggml
from .resident import read_into_memory

__all__ = ["load", "write_gguf", "write_ggml", "ModelFile", "Tensor", "Vocab", "GGUFValueType",
           "ModelFileError", "UnsupportedVersionError", "UnknownTypeError", "BadMagicError", "TruncatedFileError",
           "CorruptFileError", "gguf_name_from_ggml", "ggml_name_from_gguf"]


def advise_huge_pages(mapped: np.memmap) -> bool:
    """Advise the kernel to keep a mapped model file on 2 MiB pages (``MADV_HUGEPAGE``); True where the advice was
    taken. Decode reads every weight once per token, and on 4 KiB pages it walks the page tables every 4 KiB (two
    tables inside a VM). Linux (6.x, on filesystems with large folios) then reads the file from disk into 2 MiB
    folios of the page cache and maps them whole; pages the cache holds already stay as they are, and every later
    mapping of the file, by any process, gets the huge ones. Measured on a 2-core AMD EPYC Zen 4 VM: numpy's sum
    over a mapped 3.7 GB file 22 GB/s on 4 KiB pages, 30.5 on 2 MiB ones; Qwen2.5-0.5B q4_K_M decode on one thread
    36.0 -> 40.1 tok/s (llama.cpp 26.6 -> 28.5 from the same cache); from a cold cache, opening the model and
    its first token 1.1 -> 1.4 s, once (later opens map the cached huge pages: faster), decode on one thread
    34.9-38.3 -> 37.8-41.7 tok/s. A hint: where the platform has no such advice, or refuses it, nothing changes."""
    region = getattr(mapped, "_mmap", None)
    if region is None or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return False
    return True


def load(path, n_head_kv: int | None = None, *, context_length: int | None = None,
         rms_eps: float | None = None, in_memory: bool = False) -> ModelFile:
    """Open a GGUF or GGML model file.

    ``n_head_kv`` overrides the KV head count (GGML files do not store it; it is otherwise inferred from the
    ``wk`` shape). ``context_length`` and ``rms_eps`` override what a GGML file cannot store (defaults 2048 and
    5e-6, as llama.cpp's converter) and, when given, the GGUF keys of the same meaning.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot open model file: {exc.strerror or exc}") from None
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a model file")
    if size < 4:
        raise TruncatedFileError(path, f"file of {size} bytes is too short to hold a model file's magic", 0)
    if in_memory:
        try:
            mm = read_into_memory(path, size)
        except OSError as exc:
            raise ModelFileError(path, f"cannot read the model file into memory: {exc}") from None
    else:
        # copy-on-write, seen read-only: the loader may re-lay weights in place (quant/layouts.py), which makes the
        # pages it writes the process's own; the file is never written, and the pages only read stay shared with
        # the page cache, as a read-only mapping's are
        try:
            mapped = np.memmap(path, dtype=np.uint8, mode="c")
        except OSError:   # strict overcommit may refuse a private writable mapping: read-only (no re-laying)
            mapped = np.memmap(path, dtype=np.uint8, mode="r")
        advise_huge_pages(mapped)
        mm = mapped.view()
        mm.flags.writeable = False
    magic = bytes(mm[:4])
    if magic == GGUF_MAGIC:
        model = read_gguf(path, mm, n_head_kv=n_head_kv)
        arch = model.architecture
        if context_length is not None:
            model.metadata[f"{arch}.context_length"] = int(context_length)
        if rms_eps is not None:
            model.metadata[f"{arch}.attention.layer_norm_rms_epsilon"] = float(rms_eps)
        return model
    if magic in GGML_MAGICS:
        return read_ggml(path, mm, n_head_kv=n_head_kv, context_length=context_length, rms_eps=rms_eps)
    raise BadMagicError(path, f"not a GGUF or GGML model file (magic bytes {magic!r})", 0)
