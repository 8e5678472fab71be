"""What each quantization type costs: quantize one f16 model into every type with ggml_backend and with llama.cpp,
check the files are byte-identical, and measure perplexity of each with both engines (same chunks).

    python benchmarks/quantize_perplexity.py quantize [--dir DIR]   # f16 from the default model, then each type
    python benchmarks/quantize_perplexity.py perplexity [--dir DIR] [-c 512] [--chunks 8]

The real models ship quantized only, so the f16 source is the default model (Qwen2.5-Coder-0.5B q4_K_M)
de-quantized to f16 (``ggml-backend quantize --allow-requantize MODEL f16``): an f16 file whose weights are the
q4_K_M grid's, which is why q4_K_M and up measure alike. Needs llama-cpp-python. Perplexity text:
tests/data/perplexity/python-stdlib.txt; llama.cpp's side as tests/data/perplexity/make_reference.py computes it.
Timing figures on a shared machine are noisy: repeat, and read them as such.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "data" / "perplexity"))

LLAMA_FTYPES = {"q8_0": 7, "q6_K": 18, "q5_K_M": 17, "q4_K_M": 15, "q3_K_M": 12, "q2_K": 10}


def quantize_all(folder: Path) -> None:
    import llama_cpp
    from ggml_backend.default_model import default_model_path, file_sha256
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "qwen-f16.gguf"
    subprocess.run([sys.executable, "-m", "ggml_backend", "quantize", "--allow-requantize", "--force",
                    "--no-progress", str(default_model_path()), str(source), "f16"], check=True)
    for name, ftype in LLAMA_FTYPES.items():
        ours, theirs = folder / f"qwen-{name}.gguf", folder / f"qwen-{name}.llamacpp.gguf"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ggml_backend", "quantize", str(source), str(ours), name,
                        "--no-progress", "--force", "--threads", "2"], check=True, capture_output=True)
        t_ours = time.perf_counter() - t
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        t = time.perf_counter()
        llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params))
        t_theirs = time.perf_counter() - t
        print(f"{name}: ours {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s, identical bytes: "
              f"{file_sha256(ours) == file_sha256(theirs)}", flush=True)


def perplexity_table(folder: Path, n_ctx: int, chunks: int) -> None:
    from make_reference import TEXT, llamacpp_perplexity, read_text
    from ggml_backend import Llama, perplexity
    text = read_text(TEXT)
    for name in ["f16", *LLAMA_FTYPES]:
        path = folder / f"qwen-{name}.gguf"
        llm = Llama(str(path), n_ctx=n_ctx, n_threads=2, verbose=False)
        ours = perplexity(llm, text, n_ctx=n_ctx, chunks=chunks, n_threads=2)
        llm.close()
        theirs = llamacpp_perplexity(str(path), text, n_ctx, chunks=chunks, n_threads=2)
        print(json.dumps({"file": path.name, "bytes": os.path.getsize(path), "ppl": ours.ppl, "ppl_std": ours.ppl_std,
                          "llamacpp_ppl": theirs["ppl"], "llamacpp_ppl_std": theirs["ppl_std"],
                          "ours_tok_s": ours.tokens_per_second, "llamacpp_tok_s": theirs["tokens_per_second"]}),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["quantize", "perplexity"])
    parser.add_argument("--dir", default="quantized", help="where the files go (about 4 GB)")
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args()
    if args.step == "quantize":
        quantize_all(Path(args.dir))
    else:
        perplexity_table(Path(args.dir), args.ctx_size, args.chunks)


if __name__ == "__main__":
    main()
