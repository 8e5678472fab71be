"""``ggml-backend convert IN.ggmlv3.bin OUT.gguf``: a legacy GGML LLaMA file to GGUF.

Follows llama.cpp's convert-llama-ggml-to-gguf.py: tensor bytes are copied unchanged under their GGUF names,
the vocabulary is respelled in GGUF SentencePiece conventions ('▁' for spaces, '<0xNN>' byte tokens, token types,
unk/bos/eos = 0/1/2), and what GGML files do not store (GQA, rms epsilon, context length) comes from options.

The output never costs data: it is written to a temporary file beside OUT and renamed over it when complete
(``formats.gguf.writing_file``), input and output that are the same file (a hard link, a symlink) are refused even
with ``--force``, and an OUT that is not a regular file (a device, a directory) is refused, never replaced.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..formats import load, write_gguf


def add_arguments(parser) -> None:
    parser.add_argument("input", help="GGML LLaMA file (ggjt v3; f32/f16 of older versions too)")
    parser.add_argument("output", help="GGUF file to write")
    parser.add_argument("--gqa", type=int, default=None,
                        help="grouped-query factor n_head / n_head_kv (LLaMA-2 70B: 8); default: inferred from "
                             "the attention.wk shape")
    parser.add_argument("--eps", type=float, default=None,
                        help="rms norm epsilon (default 5e-6 as llama.cpp's converter; LLaMA-2 uses 1e-5)")
    parser.add_argument("--context-length", type=int, default=None, help="training context length (default 2048)")
    parser.add_argument("--name", default=None, help="general.name to store (default: the input file's name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def check_options(gqa: int | None, eps: float | None, context_length: int | None) -> None:
    """The options' ranges, checked before anything is read or written (GGUF stores the context length as a u32)."""
    if gqa is not None and (isinstance(gqa, bool) or not isinstance(gqa, int) or gqa < 1):
        raise ValueError(f"--gqa must be a positive integer, got {gqa!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps < 1):
        raise ValueError(f"--eps must be a finite number between 0 and 1, got {eps!r}")
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or not 1 <= context_length < 2 ** 32):
        raise ValueError(f"--context-length must be an integer from 1 to {2 ** 32 - 1}, got {context_length!r}")


def same_file(a, b) -> bool:
    """True when the paths name one file (same device and inode: a hard link, a symlink, another spelling)."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (or cannot be looked at): not the same existing file
        return False


def convert(input_path, output_path, *, gqa: int | None = None, eps: float | None = None,
            context_length: int | None = None, name: str | None = None, progress: bool = False) -> Path:
    check_options(gqa, eps, context_length)
    if same_file(input_path, output_path):
        raise ValueError(f"{output_path}: is the input file itself ({input_path}); writing it would destroy the "
                         "input")
    source = load(input_path, context_length=context_length, rms_eps=eps)
    if source.format != "ggml":
        raise ValueError(f"{input_path}: is already {source.format.upper()}; nothing to convert")
    n_head = source.metadata["llama.attention.head_count"]
    if gqa is not None:
        if n_head % gqa:
            raise ValueError(f"--gqa {gqa} does not divide n_head {n_head}")
        source = load(input_path, n_head_kv=n_head // gqa, context_length=context_length, rms_eps=eps)
    metadata = dict(source.metadata)
    if name is not None:
        metadata["general.name"] = name
    tensors = [(t.name, t.type, t.shape, t.data) for t in source.tensors.values()]
    write_gguf(output_path, metadata, tensors, value_types=source.metadata_types, progress=progress)
    return Path(output_path)


def run(args) -> int:
    output = Path(args.output)
    check_options(args.gqa, args.eps, args.context_length)
    if same_file(args.input, output):   # before --force: no option makes overwriting the input right
        print(f"ggml-backend convert: {output} is the input file itself ({args.input}); choose another output",
              file=sys.stderr)
        return 1
    if (output.exists() or output.is_symlink()) and not args.force:
        print(f"ggml-backend convert: {output} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    convert(args.input, output, gqa=args.gqa, eps=args.eps, context_length=args.context_length, name=args.name,
            progress=not args.no_progress)
    print(f"wrote {output}", file=sys.stderr)
    return 0
