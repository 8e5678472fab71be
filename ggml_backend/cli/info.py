"""``ggml-backend info FILE [--json]``: what a model file holds, without loading any weights."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

from ..formats import load
from ..formats.ggml import FTYPE_NAMES


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a .gguf or GGML (.bin) model file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _plain(value):
    """Metadata value as something JSON can hold; long arrays are summarised."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        if len(value) > 16:
            return {"array_length": len(value)}
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def describe(model) -> dict:
    """The facts ``info`` prints, as a dict (also used by tests and other commands)."""
    arch = model.architecture
    hyper = {k[len(arch) + 1:]: _plain(v) for k, v in model.metadata.items() if arch and k.startswith(arch + ".")}
    histogram: dict[str, dict] = {}
    counts = Counter()
    for t in model.tensors.values():
        entry = histogram.setdefault(t.type.name, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += t.n_elements
        entry["bytes"] += t.nbytes
        counts[t.type.name] += 1
    file_type = model.metadata.get("general.file_type")
    return {
        "path": str(model.path),
        "format": model.format,
        "container": model.container,
        "version": model.version,
        "architecture": arch,
        "name": model.metadata.get("general.name"),
        "file_type": None if file_type is None else int(file_type),
        "file_type_name": FTYPE_NAMES.get(int(file_type)) if file_type is not None else None,
        "hyperparameters": hyper,
        "vocabulary": None if model.vocab is None else {
            "model": model.vocab.model, "size": len(model.vocab), "merges": len(model.vocab.merges),
            "bos_token_id": model.vocab.bos_token_id, "eos_token_id": model.vocab.eos_token_id},
        "tensor_count": len(model.tensors),
        "tensor_types": dict(sorted(histogram.items(), key=lambda kv: -kv[1]["bytes"])),
        "parameters": model.n_parameters,
        "tensor_bytes": model.tensor_bytes,
        "file_size": model.file_size,
        "bits_per_weight": round(model.bits_per_weight, 4),
        "chat_template": "tokenizer.chat_template" in model.metadata,
    }


def _format_text(info: dict) -> str:
    lines = [
        f"file:            {info['path']}",
        f"format:          {info['format'].upper()} ({info['container']} v{info['version']})",
        f"architecture:    {info['architecture']}",
    ]
    if info["name"]:
        lines.append(f"name:            {info['name']}")
    if info["file_type"] is not None:
        lines.append(f"file type:       {info['file_type']}"
                     + (f" ({info['file_type_name']})" if info["file_type_name"] else ""))
    lines.append("hyper-parameters:")
    for key, value in info["hyperparameters"].items():
        lines.append(f"  {key:38s} {value}")
    vocab = info["vocabulary"]
    if vocab:
        extra = f", {vocab['merges']} merges" if vocab["merges"] else ""
        lines.append(f"vocabulary:      {vocab['size']} tokens ({vocab['model']}{extra}), "
                     f"bos={vocab['bos_token_id']} eos={vocab['eos_token_id']}")
    lines.append(f"tensors:         {info['tensor_count']}, {info['parameters']:,} parameters")
    for name, entry in info["tensor_types"].items():
        lines.append(f"  {name:6s} {entry['tensors']:5d} tensors {entry['parameters']:>14,} params "
                     f"{entry['bytes'] / 2 ** 20:10.2f} MiB")
    lines.append(f"file size:       {info['file_size']:,} bytes ({info['file_size'] / 2 ** 20:.2f} MiB)")
    lines.append(f"bits per weight: {info['bits_per_weight']:.2f}")
    return "\n".join(lines)


def run(args) -> int:
    info = describe(load(args.file))
    print(json.dumps(info, indent=2) if args.json else _format_text(info))
    return 0
