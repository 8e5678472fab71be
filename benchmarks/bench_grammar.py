#!/usr/bin/env python3
"""Decode speed under a JSON-schema grammar beside the same run without one (issue 12's target: >= 0.9).

usage: python benchmarks/bench_grammar.py [--tokens 96] [--repeat 3]

Each measurement: the default model (Qwen2.5-Coder-0.5B-Instruct, 151,936 tokens), a chat prompt asking for a
JSON record, greedy, `--tokens` tokens. Constrained: `response_format` with a schema of an array of records (long
enough that the grammar never completes first). Unconstrained: the same request without it, end-of-text banned,
the same number of tokens. The figure is tokens/s after the first token (the prompt is the same for both), the
median of `--repeat` alternating runs; the mask of the next token is computed while the forward pass runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

from ggml_backend import Llama

SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "minItems": 50, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "city": {"type": "string"}, "email": {"type": "string"}},
    "required": ["name", "age", "city", "email"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "List fifty made-up people as JSON: name, age, city, email."}]


def rate(llm: Llama, n_tokens: int, constrained: bool) -> float:
    kwargs = {"response_format": {"type": "json_object", "schema": SCHEMA}} if constrained else \
        {"logit_bias": {t: -100.0 for t in llm.tokenizer.eog_ids}}
    first, count = None, 0
    for chunk in llm.create_chat_completion(MESSAGES, max_tokens=n_tokens, temperature=0, stream=True,
                                            logprobs=True, **kwargs):
        if chunk["choices"][0].get("logprobs"):
            count += len(chunk["choices"][0]["logprobs"]["content"])
            if first is None:
                first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    llm = Llama(n_ctx=1024, verbose=False)
    rate(llm, 8, True)   # warm up: kernels, the tokenizer's llguidance view
    rate(llm, 8, False)
    free, held = [], []
    for _ in range(args.repeat):
        free.append(rate(llm, args.tokens, False))
        held.append(rate(llm, args.tokens, True))
    f, h = statistics.median(free), statistics.median(held)
    print(f"unconstrained {f:.1f} tok/s, JSON schema {h:.1f} tok/s, ratio {h / f:.2f} "
          f"({args.tokens} tokens, median of {args.repeat})")


if __name__ == "__main__":
    main()
