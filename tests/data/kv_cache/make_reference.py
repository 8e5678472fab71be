"""Make llama.cpp's logits for each KV cache type (tests/test_kv_cache.py compares ours with them).

Run once, where llama-cpp-python is installed (0.3.36, built with -DGGML_NATIVE=ON here) and the workplace's
shared/reference exists:  python tests/data/kv_cache/make_reference.py
It writes ``llamacpp_cache_types.json`` beside itself: for each cache type pair, llama.cpp's logits of

* the tiny synthetic q4_0 Llama (tests/data/synthetic) at the last 4 positions of ``token_sequence``
  (synthetic.json), in ``llamacpp_synthetic_logits.npz`` as float16 (rounding error < 0.002, far below the
  tolerances the tests use), one array per pair (named like ``q8_0-f16``);
* the default Qwen2.5-Coder-0.5B-Instruct q4_K_M at the last position of ``REAL_PROMPT`` (its top 40 tokens and
  their logits).

llama.cpp takes a quantized V cache only with flash attention, so q8_0 values are computed with
``flash_attn=True``; the other pairs without it (the numerics our attention kernel follows).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[3] / "shared" / "reference"
REAL_PROMPT = ("<|im_start|>user\nWrite a Python function that returns the n-th Fibonacci number, iteratively."
               "<|im_end|>\n<|im_start|>assistant\n")
PAIRS = {"f32/f32": (0, 0), "f16/f16": (1, 1), "q8_0/f16": (8, 1), "q8_0/q8_0": (8, 8)}


def main() -> None:
    import llama_cpp
    from ggml_backend.default_model import default_model_path
    sequence = json.loads((SHARED / "synthetic" / "synthetic.json").read_text())["token_sequence"]
    out = {"llama_cpp_python": llama_cpp.__version__, "token_sequence": sequence, "real_prompt": REAL_PROMPT,
           "real": {}}
    synthetic = {}
    for name, (type_k, type_v) in PAIRS.items():
        flash = type_v == 8
        llm = llama_cpp.Llama(str(SHARED / "synthetic" / "tiny-llama-q4_0.gguf"), n_ctx=64, logits_all=True,
                              type_k=type_k, type_v=type_v, flash_attn=flash, n_threads=2, verbose=False)
        llm.eval(sequence)
        synthetic[name.replace("/", "-")] = np.array(llm.scores[:len(sequence)], dtype=np.float16)[-4:]
        llm.close()

        llm = llama_cpp.Llama(str(default_model_path()), n_ctx=256, logits_all=True, type_k=type_k, type_v=type_v, flash_attn=flash,
                              n_threads=2, verbose=False)
        tokens = llm.tokenize(REAL_PROMPT.encode(), add_bos=True, special=True)
        llm.eval(tokens)
        last = np.array(llm.scores[len(tokens) - 1], dtype=np.float32)
        top = np.argsort(-last)[:40]
        out["real"][name] = {"tokens": len(tokens), "top_ids": top.tolist(),
                             "top_logits": np.round(last[top], 4).tolist()}
        llm.close()
        print(name, "done")
    (HERE / "llamacpp_cache_types.json").write_text(json.dumps(out, indent=1))
    np.savez_compressed(HERE / "llamacpp_synthetic_logits.npz", **synthetic)


if __name__ == "__main__":
    main()
