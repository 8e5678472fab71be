"""Quantize -> load -> perplexity: what each quantization type costs, on the real default model.

The model ships only as q4_K_M; re-quantizing it (``allow_requantize``, as llama-quantize's flag) gives q8_0 (more
bits than the weights now carry: the same quality), q3_K_M and q2_K (fewer: worse). The README's table has every
type from an f16 file, made with benchmarks/quantize_perplexity.py; this keeps the ordering checked in CI on a short
run (-c 128, 2 chunks of the perplexity test text: 126 scored tokens, where q8_0 sits within 0.2% of the file and
q2_K 20% above it: measured 11.52 (the file), 11.54 (q8_0), 12.95 (q3_K_M), 13.83 (q2_K))."""
from __future__ import annotations

from pathlib import Path

import pytest

from ggml_backend import Llama, perplexity, quantize_model
from ggml_backend.default_model import default_model_path

TEXT = Path(__file__).resolve().parent / "data" / "perplexity" / "python-stdlib.txt"


def short_ppl(path) -> float:
    llm = Llama(str(path), n_ctx=128, verbose=False)
    try:
        return perplexity(llm, TEXT.read_text(encoding="utf-8"), n_ctx=128, chunks=2).ppl
    finally:
        llm.close()


def test_fewer_bits_cost_perplexity(tmp_path):
    source = default_model_path(progress=False)
    figures = {"q4_K_M (the file)": short_ppl(source)}
    for name in ("q8_0", "q3_K_M", "q2_K"):
        out = tmp_path / f"model-{name}.gguf"
        quantize_model(source, out, name, allow_requantize=True)
        figures[name] = short_ppl(out)
        out.unlink()            # ~0.5 GB each: keep the disk use to one file at a time
    print(figures)
    base = figures["q4_K_M (the file)"]
    # q8_0 holds the q4_K_M weights almost exactly: the same figure within noise
    assert figures["q8_0"] == pytest.approx(base, rel=0.01)
    # fewer bits, higher perplexity, in order
    assert base < figures["q3_K_M"] < figures["q2_K"]
    assert figures["q2_K"] > 1.1 * base
