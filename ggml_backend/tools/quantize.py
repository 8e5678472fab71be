"""Quantize a model file: an f32/f16/bf16 GGUF or GGML file to a llama.cpp file type (``Q4_K_M``, ``Q8_0``, ...).

What llama.cpp's ``llama-quantize`` does, with our readers, writers and quantizers:

* each tensor's type comes from ``quant_mix.plan_tensor_types`` (llama.cpp's per-tensor mixes);
* the GGUF metadata is copied in order, without the split keys, and ``general.quantization_version`` (2) and
  ``general.file_type`` (the LLAMA_FTYPE id) are set last, as llama.cpp's ``gguf_set_val_u32`` appends them;
  tensors are written in llama.cpp's order, each padded to the 32-byte alignment, so a file quantized here with
  the types llama.cpp quantizes bit-exactly is byte-identical to llama.cpp's;
* ``ggml=True`` writes a GGML ggjt v3 file instead (``formats.write_ggml``; LLaMA models only);
* the work streams: a tensor is read, converted and written a block of rows at a time (about 4 MB of float32),
  and the source pages already used are dropped from the process, so the peak memory is a few such blocks
  whatever the model's size;
* the output goes to a temporary file beside ``dst`` that is renamed over it only when complete
  (``formats.gguf.writing_file``): an error or Ctrl-C part-way (a full disk, a NaN in a tensor) leaves ``dst``
  as it was;
* a tensor that is already quantized is converted only with ``allow_requantize=True`` (dequantize, quantize
  again: quality is lost twice), as llama.cpp refuses it by default.
"""
from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..formats import load, write_ggml, write_gguf
from ..formats.ggml import legacy_vocab_from_gguf
from ..formats.gguf import GGUFValueType
from ..quant.types import get_type
from .quant_mix import FileType, TensorPlan, parse_file_type, plan_tensor_types

GGML_QNT_VERSION = 2            # general.quantization_version that llama.cpp writes
CHUNK_VALUES = 1 << 20          # float32 values converted at a time (4 MB), whatever the tensor's size
_FLOAT_TYPES = ("f32", "f16", "bf16")
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


@dataclass
class QuantizeResult:
    path: Path
    file_type: FileType
    format: str                     # "gguf" or "ggml"
    n_tensors: int
    source_bytes: int               # tensor data of the input
    output_bytes: int               # tensor data written
    n_parameters: int
    seconds: float
    types: Counter = field(default_factory=Counter)   # target type name -> tensor count

    @property
    def bits_per_weight(self) -> float:
        return self.output_bytes * 8 / self.n_parameters if self.n_parameters else 0.0


def same_file(a, b) -> bool:
    """True when the paths name one existing file (a hard link, a symlink, another spelling)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def quantize_model(src, dst, file_type, *, ggml: bool = False, leave_output_tensor: bool = False,
                   pure: bool = False, allow_requantize: bool = False, output_tensor_type=None,
                   token_embedding_type=None, threads: int | None = None, progress=False) -> QuantizeResult:
    """Quantize the model file ``src`` into ``dst`` as ``file_type`` (a llama-quantize name such as ``"Q4_K_M"``,
    an alias such as ``"q4_k"``, or the LLAMA_FTYPE id). Returns what was written. An existing ``dst`` is replaced
    (once the new file is complete), as llama-quantize does; the command line asks for ``--force`` first.

    ``ggml``: write a GGML ggjt v3 file instead of GGUF. ``leave_output_tensor``: keep output.weight's type.
    ``pure``: no mix, every quantizable tensor gets the base type. ``allow_requantize``: accept tensors that are
    already quantized. ``output_tensor_type`` / ``token_embedding_type``: a tensor type for those two tensors.
    ``threads``: numba threads for the conversion (default: as configured). ``progress``: True for a tqdm bar
    on stderr (or a tqdm-like object)."""
    ft = parse_file_type(file_type)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    for what, value in (("output_tensor_type", output_tensor_type), ("token_embedding_type", token_embedding_type)):
        if value is not None:
            get_type(value)   # ValueError naming the known types
    src, dst = Path(src), Path(dst)
    if same_file(src, dst):
        raise ValueError(f"{dst}: is the input file itself ({src}); writing it would destroy the input")
    started = time.perf_counter()
    model = load(src)
    split_count = model.metadata.get("split.count")
    if split_count is not None and int(split_count) > 1:
        raise ValueError(f"{src}: is part {int(model.metadata.get('split.no', 0)) + 1} of a model split in "
                         f"{int(split_count)} files; merge the parts first (llama-gguf-split --merge)")
    plan = plan_tensor_types(model.tensors.values(), ft, model.metadata, pure=pure,
                             leave_output_tensor=leave_output_tensor, output_tensor_type=output_tensor_type,
                             token_embedding_type=token_embedding_type)
    check_plan(plan, src, allow_requantize=allow_requantize)
    tensors = [(p.name, p.target_type, p.shape, _tensor_source(model, p)) for p in plan]
    output_bytes = sum(math.prod(p.shape[:-1]) * p.target_type.row_bytes(p.shape[-1]) for p in plan)
    try:
        with _numba_threads(threads):
            if ggml:
                hparams, vocab = ggml_header(model, ft)
                write_ggml(dst, hparams, vocab, tensors, progress=progress)
            else:
                metadata, value_types = output_metadata(model, ft)
                write_gguf(dst, metadata, tensors, value_types=value_types,
                           alignment=int(metadata.get("general.alignment", 32)), progress=progress)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            reason = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large",
                      errno.EDQUOT: "disk quota exceeded"}[exc.errno]
            raise OSError(exc.errno, f"{dst}: {reason} while writing the quantized model "
                          f"({output_bytes:,} bytes of tensors); nothing was written") from None
        raise
    return QuantizeResult(path=dst, file_type=ft, format="ggml" if ggml else "gguf", n_tensors=len(plan),
                          source_bytes=model.tensor_bytes, output_bytes=output_bytes,
                          n_parameters=model.n_parameters, seconds=time.perf_counter() - started,
                          types=Counter(p.target_type.name for p in plan))


def check_plan(plan: list[TensorPlan], src, *, allow_requantize: bool) -> None:
    """Refuse, before anything is written, what cannot be done: converting an already quantized tensor without
    ``allow_requantize``, or a conversion this engine has no kernel for."""
    for p in plan:
        if not p.converted:
            continue
        if p.source_type.name not in _FLOAT_TYPES and not allow_requantize:
            raise ValueError(f"{src}: tensor {p.name!r} is already quantized ({p.source_type.name}); requantizing "
                             f"loses quality twice and is refused unless --allow-requantize is given "
                             f"(allow_requantize=True), as llama.cpp does")
        if p.source_type.dequantize is None:
            raise ValueError(f"tensor {p.name!r}: this engine cannot read {p.source_type.name} values to convert")
        if p.target_type.quantize is None:
            raise ValueError(f"tensor {p.name!r}: this engine has no {p.target_type.name} quantizer yet; "
                             f"choose another type")


def convert_tensor(tensor, target_type, chunk_values: int = CHUNK_VALUES, *, consumed=None):
    """The bytes of ``tensor`` (a ``formats.Tensor``) as ``target_type``, a block of whole rows at a time
    (an iterator of uint8 arrays). A tensor of that type already is passed through unchanged. ``consumed``, if
    given, is called with (first byte, end byte) of the source range that each chunk came from, once that chunk
    has been taken (the writer wrote it)."""
    target = get_type(target_type)
    source = tensor.type
    data = tensor.data
    if source is target:
        step = max(1, chunk_values * 4)
        for start in range(0, tensor.nbytes, step):
            yield data[start:start + step]
            if consumed is not None:
                consumed(start, min(start + step, tensor.nbytes))
        return
    from .. import quant   # the kernels (numba) are loaded only when a tensor is converted
    row_length = tensor.shape[-1] if tensor.shape else 1
    n_rows = math.prod(tensor.shape[:-1])
    row_bytes = source.row_bytes(row_length)
    rows_per_chunk = max(1, chunk_values // max(row_length, 1))
    for first in range(0, n_rows, rows_per_chunk):
        n = min(rows_per_chunk, n_rows - first)
        start, end = first * row_bytes, (first + n) * row_bytes
        values = quant.dequantize(source, data[start:end], (n, row_length))
        if not np.isfinite(values).all():
            bad = np.argwhere(~np.isfinite(values))[0]
            raise ValueError(f"tensor {tensor.name!r} holds {values[tuple(bad)]} at row {first + int(bad[0])}, "
                             f"column {int(bad[1])}; llama.cpp refuses to quantize NaN and infinite values")
        yield quant.quantize(target, values)
        if consumed is not None:
            consumed(start, end)


def _tensor_source(model, p: TensorPlan):
    """A callable the writers call when they reach the tensor: its converted chunks; the source pages each chunk
    was read from are given back as soon as it is written, so that reading the model never keeps it in memory."""
    tensor = model.tensors[p.name]

    def chunks():
        yield from convert_tensor(tensor, p.target_type,
                                  consumed=lambda a, b: _drop_pages(model, tensor.offset + a, b - a))
    return chunks


def _drop_pages(model, offset: int, nbytes: int) -> None:
    """madvise(DONTNEED) over the whole pages of [offset, offset + nbytes) of the read-only file mapping: they
    leave this process's memory (a later read faults them in again from the page cache; nothing is lost)."""
    raw = getattr(model.mmap, "_mmap", None)   # np.memmap keeps its mmap.mmap here
    if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset - offset % mmap.PAGESIZE
    end = min(offset + nbytes, len(raw))
    end -= end % mmap.PAGESIZE   # a partial last page stays (the next chunk may still need it)
    if end > start:
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(mmap.MADV_DONTNEED, start, end - start)


def output_metadata(model, ft: FileType) -> tuple[dict, dict]:
    """The input's GGUF keys in order, less the split keys, with the quantization version and file type last.
    A ``general.alignment`` is kept and the file written with it (llama.cpp would pad to 32 whatever it says)."""
    metadata, value_types = dict(model.metadata), dict(model.metadata_types)
    for key in (*_SPLIT_KEYS, "general.quantization_version", "general.file_type"):
        metadata.pop(key, None)
        value_types.pop(key, None)
    metadata["general.quantization_version"] = GGML_QNT_VERSION
    metadata["general.file_type"] = ft.ftype
    value_types["general.quantization_version"] = value_types["general.file_type"] = GGUFValueType.UINT32
    return metadata, value_types


def ggml_header(model, ft: FileType) -> tuple[dict, list]:
    """GGML ggjt v3 hyper-parameters and vocabulary for a LLaMA model (the only architecture GGML files hold)."""
    if model.architecture != "llama":
        raise ValueError(f"{model.path}: a GGML file holds a LLaMA model, not {model.architecture or 'this'!r}; "
                         "write GGUF instead (no --ggml)")
    if model.vocab is None:
        raise ValueError(f"{model.path}: has no vocabulary, which a GGML file must hold")
    n_embd = int(model.arch_key("embedding_length"))
    n_head = int(model.arch_key("attention.head_count"))
    gate = model.tensors.get("blk.0.ffn_gate.weight")
    n_ff = int(gate.shape[0]) if gate is not None else int(model.arch_key("feed_forward_length", 4 * n_embd))
    hparams = {"n_vocab": len(model.vocab), "n_embd": n_embd, "n_mult": ggml_n_mult(n_embd, n_ff),
               "n_head": n_head, "n_layer": int(model.arch_key("block_count")),
               "n_rot": int(model.arch_key("rope.dimension_count", n_embd // max(n_head, 1))), "ftype": ft.ftype}
    return hparams, legacy_vocab_from_gguf(model.vocab)


def ggml_n_mult(n_embd: int, n_ff: int) -> int:
    """GGML files store n_mult, from which 2023 loaders compute n_ff = n_mult * ceil((8 * n_embd / 3) / n_mult):
    the largest power of two that gives back ``n_ff``, else ``n_ff`` itself when that works, else 256 (then only
    loaders that read n_ff from the tensor shapes, as ours does, get it right)."""
    base = 2 * (4 * n_embd) // 3
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if m * -(-base // m) == n_ff:
            return m
    return n_ff if n_ff >= base and n_ff > 0 else 256


@contextlib.contextmanager
def _numba_threads(threads: int | None):
    if threads is None:
        yield
        return
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)
