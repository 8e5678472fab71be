"""Writes ``llamacpp_token_by_token.json``: llama.cpp's logits at the first generated position of each shared prompt
(``greedy[]`` of the two real-model JSON files) when it evaluates the prompt one token at a time (``n_batch=1``).

Why: llama.cpp's reference logits (``first_top10_logits``) come from one batch of the whole prompt, which runs its
matrix-matrix kernels (repacked weights, llamafile's sgemm); one token at a time runs its vector kernels
(``ggml_vec_dot_*``). Both are llama.cpp and both are right: they add the same exact block products in another
float order, and 8-bit activation quantization turns an ulp of difference into a whole quantization step now and
then. Measured with llama-cpp-python 0.3.36 (built with ``-DGGML_NATIVE=ON``, AVX2) on a 2-core AMD EPYC: the two
runs differ in the top-10 logits by up to 0.22 on Qwen2.5-Coder-0.5B and 0.64 on Gemma 3 270M (large activation
outliers), the same for 1 and 2 threads. The real-model test compares our logits with the nearer of llama.cpp's
two runs, so a tolerance can sit under llama.cpp's own spread without failing on a valid order.

Run where ``llama_cpp`` is importable: ``python tests/data/real/make_token_by_token.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))


def main() -> None:
    import llama_cpp
    from refdata import real_json, real_model
    out = {"llama_cpp_python": llama_cpp.__version__,
           "system_info": llama_cpp.llama_print_system_info().decode().strip(), "models": {}}
    for which in ("qwen", "gemma"):
        llm = llama_cpp.Llama(str(real_model(which)), n_ctx=160, n_batch=1, n_ubatch=1, n_threads=2,
                              logits_all=True, verbose=False)
        cases = []
        for case in real_json(which)["greedy"]:
            llm.reset()
            llm.eval(case["prompt_tokens"])
            first = np.asarray(llm.scores[len(case["prompt_tokens"]) - 1], dtype=np.float32)
            cases.append({"prompt": case["prompt"],
                          "first_top10_logits": [float(first[i]) for i in case["first_top10_ids"]]})
        out["models"][which] = cases
        del llm
    (HERE / "llamacpp_token_by_token.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
