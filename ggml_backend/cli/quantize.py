"""``ggml-backend quantize IN [OUT] TYPE``: llama.cpp's ``llama-quantize`` (see ``ggml_backend.tools.quantize``).

TYPE is a llama-quantize name (Q4_K_M, q8_0, ... any case), an alias (Q4_K = Q4_K_M) or the LLAMA_FTYPE id
(15). Without OUT the file is written beside IN as ``ggml-model-TYPE.gguf`` (``.bin`` with ``--ggml``), as
llama-quantize names it. An existing OUT is replaced only with ``--force``; OUT that is IN (a link, another
spelling) is always refused.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..tools.quant_mix import FILE_TYPES, parse_file_type, plan_tensor_types


def add_arguments(parser) -> None:
    parser.add_argument("input", help="an f32/f16/bf16 GGUF or GGML model file")
    parser.add_argument("output", metavar="OUT",
                        help="the file to write; or, given alone, TYPE (the output is then ggml-model-TYPE.gguf "
                             "beside IN, as llama-quantize names it)")
    parser.add_argument("type", metavar="TYPE", nargs="?",
                        help=f"file type: {', '.join(FILE_TYPES)} (any case; aliases Q3_K, Q4_K, Q5_K = their _M; "
                             "or the LLAMA_FTYPE id)")
    parser.add_argument("--ggml", action="store_true", help="write a GGML ggjt v3 file instead of GGUF (LLaMA only)")
    parser.add_argument("--leave-output-tensor", action="store_true",
                        help="keep output.weight as it is (bigger file, sometimes better quality)")
    parser.add_argument("--pure", action="store_true",
                        help="no per-tensor mix: every quantizable tensor gets the type's base type")
    parser.add_argument("--allow-requantize", action="store_true",
                        help="accept tensors that are already quantized (quality is lost twice)")
    parser.add_argument("--output-tensor-type", default=None, metavar="TYPE", help="tensor type for output.weight")
    parser.add_argument("--token-embedding-type", default=None, metavar="TYPE",
                        help="tensor type for token_embd.weight")
    parser.add_argument("--threads", "-t", type=int, default=None, help="threads for the conversion")
    parser.add_argument("--dry-run", action="store_true", help="print each tensor's type and the sizes; write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def _paths(args) -> tuple[Path, str]:
    if args.type is not None:
        return Path(args.output), args.type
    type_spec = args.output
    name = parse_file_type(type_spec).name
    return Path(args.input).parent / f"ggml-model-{name}.{'bin' if args.ggml else 'gguf'}", type_spec


def run(args) -> int:
    from ..tools.quantize import quantize_model, same_file

    output, type_spec = _paths(args)
    file_type = parse_file_type(type_spec)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.dry_run:
        return _dry_run(args, file_type)
    if same_file(args.input, output):   # before --force: no option makes overwriting the input right
        raise ValueError(f"{output} is the input file itself ({args.input}); choose another output")
    if (output.exists() or output.is_symlink()) and not args.force:
        raise ValueError(f"{output} exists (use --force to overwrite)")
    result = quantize_model(args.input, output, file_type, ggml=args.ggml,
                            leave_output_tensor=args.leave_output_tensor, pure=args.pure,
                            allow_requantize=args.allow_requantize, output_tensor_type=args.output_tensor_type,
                            token_embedding_type=args.token_embedding_type, threads=args.threads,
                            progress=not args.no_progress)
    mix = ", ".join(f"{n} {name}" for name, n in result.types.most_common())
    print(f"wrote {output} ({result.format.upper()}, {file_type.name}): {result.n_tensors} tensors ({mix}); "
          f"{result.source_bytes / 2**20:.2f} MiB -> {result.output_bytes / 2**20:.2f} MiB "
          f"({result.bits_per_weight:.2f} bits per weight) in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def _dry_run(args, file_type) -> int:
    from ..formats import load

    model = load(args.input)
    plan = plan_tensor_types(model.tensors.values(), file_type, model.metadata, pure=args.pure,
                             leave_output_tensor=args.leave_output_tensor,
                             output_tensor_type=args.output_tensor_type,
                             token_embedding_type=args.token_embedding_type)
    before = after = 0
    for p in plan:
        n_rows = 1
        for d in p.shape[:-1]:
            n_rows *= d
        size_in = n_rows * p.source_type.row_bytes(p.shape[-1])
        size_out = n_rows * p.target_type.row_bytes(p.shape[-1])
        before, after = before + size_in, after + size_out
        shape = ", ".join(str(d) for d in reversed(p.shape))
        print(f"{p.name:<36} [{shape:>18}] {p.source_type.name:>5} -> {p.target_type.name:<5} "
              f"{size_in / 2**20:9.3f} MiB -> {size_out / 2**20:9.3f} MiB")
    print(f"model size {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({file_type.name}, "
          f"{after * 8 / max(model.n_parameters, 1):.2f} bits per weight)")
    return 0
