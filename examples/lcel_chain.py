"""LCEL chain: PromptTemplate | GGMLLLM | StrOutputParser, writing a small Python function.

    python examples/lcel_chain.py --task "write a Python function that checks if a number is prime"
"""
from __future__ import annotations

import argparse

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from langchain_ggml import GGMLLLM

# Qwen2.5-Coder is an instruct model: a ChatML-shaped prompt makes it answer rather than ramble.
PROMPT = PromptTemplate.from_template(
    "<|im_start|>system\nYou are a coding assistant. Answer with code only.<|im_end|>\n"
    "<|im_start|>user\n{task}<|im_end|>\n<|im_start|>assistant\n```python\n")


def build_chain(max_tokens: int = 64, temperature: float = 0.0, model_path: str | None = None, n_ctx: int = 1024):
    llm = GGMLLLM(model_path=model_path, n_ctx=n_ctx, max_tokens=max_tokens, temperature=temperature,
                  stop=["```"])
    return PROMPT | llm | StrOutputParser()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="write a Python function that reverses a string")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model", default=None, help="model file (default: the built-in Qwen2.5-Coder-0.5B)")
    parser.add_argument("--n-ctx", type=int, default=1024)
    args = parser.parse_args(argv)
    chain = build_chain(args.max_tokens, args.temperature, args.model, args.n_ctx)
    code = chain.invoke({"task": args.task})
    print(code)
    return code


if __name__ == "__main__":
    main()
