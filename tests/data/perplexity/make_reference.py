"""Compute llama.cpp's perplexity figures for tests/data/perplexity/ with llama-cpp-python (run once, by hand).

    python tests/data/perplexity/make_reference.py              # writes reference.json beside this file
    python tests/data/perplexity/make_reference.py --variants   # adds llama.cpp's figures under VARIANTS
    python tests/data/perplexity/make_reference.py --synthetic  # recomputes the tiny synthetic models' runs only

llama.cpp's own ``llama-perplexity`` is not installed here, so this replays its procedure
(tools/perplexity/perplexity.cpp, ``perplexity()``) on llama-cpp-python's bindings of the same library:

* the text is read as ``-f`` reads it (one trailing newline dropped) and tokenized once, with BOS when the model
  adds one and special tokens as text (``common_tokenize(ctx, prompt, true)``);
* at least 2 * n_ctx tokens are needed; chunks are consecutive n_ctx-token slices (tokens // n_ctx of them, or
  ``--chunks``);
* each chunk is evaluated from a cleared KV cache, its first token replaced by BOS when the model adds BOS;
* only the second half is scored: with first = n_ctx // 2, the logits at positions first .. n_ctx-2 predict
  tokens first+1 .. n_ctx-1; each negative log-likelihood is ``max + log(sum exp(logit - max)) - logit[tok]``
  (max and each exp in float32, the sum in double: ``log_softmax`` there);
* the running ``[i]`` perplexity is exp(mean nll) after chunk i; the final estimate's uncertainty is
  sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)) * ppl.

The figures are written with the token count and a hash of the token ids, so a test can tell a tokenizer
difference from a numerical one. ``llamacpp_perplexity`` is also what benchmarks/bench_perplexity.py times.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEXT = HERE / "python-stdlib.txt"
REPO = HERE.parents[2]

# (name, n_ctx, chunks): what the tests compare (cheap), and the longer runs the README reports
RUNS = [("qwen", 128, 4), ("gemma", 128, 4), ("qwen", 512, None), ("gemma", 512, None)]
SYNTHETIC = ["q4_0", "q2_K", "q3_K_M", "q4_K_M", "q5_K_M"]
# 32 chunks (2,016 tokens scored): on 4 chunks llama.cpp's own figure for these random-weight models moved by up
# to 0.2% between its valid ways (flash attention: q3_K_M -0.21%, q4_K_M +0.13%) and by 0.18% between two
# machines, the size of the tolerance the tests hold us to; on 32 we were within 0.04% of it in every type.
SYNTHETIC_RUN = (128, 32)
# llama.cpp's figure for the same chunks computed its other valid ways: how far llama.cpp moves from itself
# (float summation order and f16 roundings), the scale against which a difference between engines is read
VARIANTS = {"flash_attn": {"flash_attn": True}, "n_batch_32": {"n_batch": 32}}


def read_text(path) -> str:
    """The file as llama.cpp's ``-f`` reads it: the whole file, one trailing newline dropped."""
    text = Path(path).read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text


def tokens_sha256(tokens) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """llama.cpp's ``log_softmax`` negated, for rows of logits [n, n_vocab] and their next tokens."""
    logits = np.asarray(logits, dtype=np.float32)
    row_max = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - row_max).astype(np.float64).sum(axis=1)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return row_max[:, 0].astype(np.float64) + np.log(sum_exp) - picked


def llamacpp_perplexity(model_path, text: str, n_ctx: int, chunks: int | None = None, n_threads: int = 2, *,
                        n_batch: int | None = None, flash_attn: bool = False):
    """llama.cpp's perplexity of ``text`` (see the module docstring), through llama-cpp-python. ``n_batch``
    (default n_ctx: one chunk per decode) and ``flash_attn`` pick among llama.cpp's own equally valid ways to
    compute the same thing (see ``VARIANTS``).

    Runs on llama.cpp's C API as the tool does (``llama_decode`` of a batch that asks for logits at positions
    >= n_ctx/2 only), so its time is the tool's; the log-softmax is done here in numpy, outside that time.
    Returns a dict: ppl, ppl_std, chunk_ppl (running values), n_tokens, tokens_sha256, tokens_scored,
    eval_seconds (the chunks' evaluation alone), tokens_per_second (evaluated tokens / eval_seconds)."""
    import llama_cpp
    n_batch = n_batch or n_ctx
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=n_threads,
                          n_threads_batch=n_threads, flash_attn=flash_attn, verbose=False)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        ctx = llm.ctx
        n_vocab = llm.n_vocab()
        add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
        bos = llm.token_bos()
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(tokens) < 2 * n_ctx:
            raise ValueError(f"{len(tokens)} tokens; llama.cpp needs at least {2 * n_ctx}")
        n_chunk = len(tokens) // n_ctx if chunks is None else min(chunks, len(tokens) // n_ctx)
        first = n_ctx // 2
        nll = nll2 = 0.0
        count = 0
        running = []
        eval_s = 0.0
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if add_bos:
                chunk[0] = bos
            t0 = time.perf_counter()
            # as the tool: a cleared KV cache, llama_decode over batches of n_batch tokens, outputs (logits)
            # requested for positions >= first only
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            rows = []
            for start in range(0, n_ctx, n_batch):
                size = min(n_batch, n_ctx - start)
                for k in range(size):
                    batch.token[k] = chunk[start + k]
                    batch.pos[k] = start + k
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = 0
                    batch.logits[k] = start + k >= first
                batch.n_tokens = size
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed on chunk {i}")
                n_out = sum(1 for k in range(size) if start + k >= first)
                if n_out:
                    rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx),
                                                      shape=(n_out * n_vocab,)).reshape(n_out, n_vocab).copy())
            eval_s += time.perf_counter() - t0
            logits = np.concatenate(rows)[:n_ctx - 1 - first]
            values = nll_rows(logits, np.array(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]))
            nll += float(values.sum())
            nll2 += float((values * values).sum())
            count += len(values)
            running.append(float(np.exp(nll / count)))
        mean = nll / count
        ppl = float(np.exp(mean))
        var = nll2 / count - mean * mean
        std = float(np.sqrt(var / (count - 1)) * ppl) if var > 0 else float("nan")
        return {"ppl": ppl, "ppl_std": std, "chunk_ppl": running, "n_tokens": len(tokens),
                "tokens_sha256": tokens_sha256(tokens), "tokens_scored": count, "chunks": n_chunk,
                "n_ctx": n_ctx, "add_bos": bool(add_bos), "eval_seconds": eval_s,
                "tokens_per_second": n_chunk * n_ctx / eval_s}
    finally:
        llama_cpp.llama_batch_free(batch)
        llm.close()


def model_paths() -> dict:
    sys.path.insert(0, str(REPO))
    from ggml_backend.default_model import default_model_path, gemma_model_path
    paths = {"qwen": default_model_path(progress=False), "gemma": gemma_model_path()}
    for kind in SYNTHETIC:
        paths[f"tiny-llama-{kind}"] = REPO / "tests" / "data" / "synthetic" / f"tiny-llama-{kind}.gguf"
    return paths


def add_variants(path: Path = HERE / "reference.json") -> None:
    """``--variants``: llama.cpp's figures of the real models' -c 128 runs under ``VARIANTS``, added to each run's
    entry of an existing reference.json as ``llama_cpp_variants`` (name -> PPL)."""
    text = read_text(TEXT)
    paths = model_paths()
    reference = json.loads(path.read_text(encoding="utf-8"))
    for run in reference["runs"]:
        if run["model"] in ("qwen", "gemma") and run["n_ctx"] == 128:
            run["llama_cpp_variants"] = {
                name: llamacpp_perplexity(paths[run["model"]], text, run["n_ctx"], run["chunks"], **settings)["ppl"]
                for name, settings in VARIANTS.items()}
            print(run["model"], run["ppl"], run["llama_cpp_variants"], flush=True)
    path.write_text(json.dumps(reference, indent=1) + "\n", encoding="utf-8")


def refresh_synthetic(path: Path = HERE / "reference.json") -> None:
    """``--synthetic``: the tiny synthetic models' runs (``SYNTHETIC_RUN``) recomputed in an existing
    reference.json, the real models' runs left as they are."""
    text = read_text(TEXT)
    paths = model_paths()
    reference = json.loads(path.read_text(encoding="utf-8"))
    kept = [run for run in reference["runs"] if not run["model"].startswith("tiny-llama-")]
    reference["runs"] = kept + [_figures(name, paths[name], text, *SYNTHETIC_RUN)
                                for name in (f"tiny-llama-{kind}" for kind in SYNTHETIC)]
    path.write_text(json.dumps(reference, indent=1) + "\n", encoding="utf-8")


def _figures(name: str, model_path, text: str, n_ctx: int, chunks: int | None) -> dict:
    figures = llamacpp_perplexity(model_path, text, n_ctx, chunks)
    figures.pop("eval_seconds")
    figures.pop("tokens_per_second")   # timings belong to benchmarks/bench_perplexity.py
    figures = {"model": name, "model_file": os.path.basename(model_path), **figures}
    print(f"{name:22s} -c {n_ctx:4d} chunks {figures['chunks']:3d}: PPL = {figures['ppl']:.4f} "
          f"+/- {figures['ppl_std']:.5f}", flush=True)
    return figures


def main() -> None:
    import llama_cpp
    if sys.argv[1:] == ["--variants"]:
        add_variants()
        return
    if sys.argv[1:] == ["--synthetic"]:
        refresh_synthetic()
        return
    text = read_text(TEXT)
    paths = model_paths()
    runs = [(name, n_ctx, chunks) for name, n_ctx, chunks in RUNS]
    runs += [(f"tiny-llama-{kind}", *SYNTHETIC_RUN) for kind in SYNTHETIC]
    results = [_figures(name, paths[name], text, n_ctx, chunks) for name, n_ctx, chunks in runs]
    out = {"source": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp), by {Path(__file__).name}",
           "text": TEXT.name, "text_sha256": hashlib.sha256(TEXT.read_bytes()).hexdigest(), "runs": results}
    (HERE / "reference.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    add_variants()


if __name__ == "__main__":
    main()
