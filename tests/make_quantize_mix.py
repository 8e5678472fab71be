"""Remake ``tests/data/quantize_mix.json``: llama.cpp's quantizations of the test source models.

    python tests/make_quantize_mix.py        (needs llama_cpp, i.e. llama-cpp-python; 0.3.36 made the stored file)

Each source model of ``quantize_sources`` is written, then quantized by ``llama_cpp.llama_model_quantize`` with
``llama_model_quantize_default_params()`` (no importance matrix, one thread) into every file type in ``CASES``;
for each output the JSON keeps the file's size and sha256, its metadata keys in order and, per tensor, the name,
type, dims (ggml order) and the sha256 of its bytes. A quantization llama.cpp refuses keeps its error message.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from quantize_sources import SOURCES, sha256_file, tensor_digests, write_source  # noqa: E402

from ggml_backend.formats import load  # noqa: E402
from ggml_backend.quant.types import get_type  # noqa: E402
from ggml_backend.tools.quant_mix import FILE_TYPES  # noqa: E402

OUT = Path(__file__).parent / "data" / "quantize_mix.json"
ALL_TYPES = list(FILE_TYPES)   # F32 F16 BF16 Q4_0 ... Q6_K
K_TYPES = [t for t in ALL_TYPES if "_K" in t]
# (source, file type, options): options are llama_model_quantize_params fields, and our keyword arguments
CASES = [(s, t, {}) for s in ("a", "b") for t in ALL_TYPES]
CASES += [(s, t, {}) for s in ("c",) for t in K_TYPES + ["Q4_0", "Q8_0", "F16"]]
CASES += [(s, t, {}) for s in ("d", "e") for t in K_TYPES + ["Q4_0", "Q8_0"]]
CASES += [("f", "Q3_K_M", {}), ("f", "Q4_K_S", {})]
CASES += [
    ("a", "Q4_K_M", {"pure": True}),
    ("b", "Q3_K_M", {"pure": True}),
    ("a", "Q4_0", {"leave_output_tensor": True}),
    ("a", "Q4_K_S", {"output_tensor_type": "q8_0", "token_embedding_type": "q5_0"}),
    ("b", "Q5_K_M", {"output_tensor_type": "q5_1"}),
    ("a", "Q6_K", {"token_embedding_type": "q8_0"}),
]


# The real models from PyPI (already Q4_K_M; requantized with allow_requantize): tensor types for these file types,
# and the whole Q8_0 file of Gemma 3 270M (about 280 MB, seconds to make)
REAL_TYPES = ["Q2_K", "Q3_K_L", "Q4_K_M", "Q5_K_S", "Q4_0", "Q8_0"]
REAL_FILE = ("gemma", "Q8_0")


def case_key(source: str, file_type: str, options: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{source}/{file_type}" + (f"[{extra}]" if extra else "")


def _llama_cpp_quantize(llama_cpp, src: Path, dst: Path, file_type: str, options: dict) -> str | None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type].ftype
    params.nthread = 1
    if options.get("pure"):
        params.pure = True
    if options.get("allow_requantize"):
        params.allow_requantize = True
    if options.get("leave_output_tensor"):
        params.quantize_output_tensor = False
    if "output_tensor_type" in options:
        params.output_tensor_type = get_type(options["output_tensor_type"]).type_id
    if "token_embedding_type" in options:
        params.token_embedding_type = get_type(options["token_embedding_type"]).type_id
    # llama.cpp logs its error on stderr: catch the file descriptor's output to keep the message
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if rc == 0:
        return None
    match = re.search(r"failed to quantize: (.*)", text)
    return match.group(1).strip() if match else text.strip().splitlines()[-1]


def main() -> int:
    import llama_cpp
    result = {
        "note": "Made by tests/make_quantize_mix.py: the source models of tests/quantize_sources.py quantized by "
                f"llama.cpp through llama-cpp-python {llama_cpp.__version__} (llama_model_quantize, default "
                "params, no imatrix, nthread 1) on an AMD EPYC (x86-64). Per output: file size and sha256, "
                "metadata keys in order, and each tensor's name, type, dims (ggml order, row length first) and "
                "sha256 of its bytes; or llama.cpp's error message when it refuses the quantization.",
        "llama_cpp_python": llama_cpp.__version__,
        "sources": {},
        "outputs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in SOURCES:
            path = write_source(name, tmp / f"{name}.gguf")
            result["sources"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        for source, file_type, options in CASES:
            key = case_key(source, file_type, options)
            dst = tmp / "out.gguf"
            error = _llama_cpp_quantize(llama_cpp, tmp / f"{source}.gguf", dst, file_type, options)
            if error is not None:
                result["outputs"][key] = {"error": error}
            else:
                result["outputs"][key] = {"size": dst.stat().st_size, "sha256": sha256_file(dst),
                                          "metadata_keys": list(load(dst).metadata), "tensors": tensor_digests(dst)}
                dst.unlink()
            print(key, error or "ok", file=sys.stderr)
    result["real"] = real_models(llama_cpp)
    OUT.write_text(json.dumps(result, indent=0, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)", file=sys.stderr)
    return 0


def real_models(llama_cpp) -> dict:
    from ggml_backend import default_model
    paths = {"qwen": default_model.default_model_path(progress=False), "gemma": default_model.gemma_model_path()}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out.gguf"
        for which, path in paths.items():
            for file_type in REAL_TYPES:
                error = _llama_cpp_quantize(llama_cpp, path, dst, file_type, {"allow_requantize": True})
                assert error is None, error
                entry = {"source_sha256": sha256_file(path),
                         "types": [[t.name, t.type.name] for t in load(dst).tensors.values()]}
                if (which, file_type) == REAL_FILE:
                    entry.update(size=dst.stat().st_size, sha256=sha256_file(dst))
                out[f"{which}/{file_type}"] = entry
                dst.unlink()
                print(f"{which}/{file_type} ok", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
