"""ggml_backend: pure-Python (numpy + numba) inference for quantized Llama-family models in GGML and GGUF files."""
from .formats import load

__version__ = "0.1.0"

# what ``from ggml_backend import X`` finds, as ``from llama_cpp import X``; imported on first use so that
# ``ggml_backend.load`` and ``ggml-backend info`` stay light (``Llama`` pulls in numba)
_LAZY = {
    "Llama": "api", "LlamaState": "api", "LogitsProcessorList": "api", "StoppingCriteriaList": "api",
    "LogitsProcessor": "api", "StoppingCriteria": "api", "MinTokensLogitsProcessor": "api",
    "LLAMA_DEFAULT_SEED": "api",
    "LlamaRAMCache": "prompt_cache", "LlamaDiskCache": "prompt_cache", "LlamaCache": "prompt_cache",
    "LlamaTokenizer": "tokenizer",
    "LlamaGrammar": "generation.grammar", "GrammarError": "generation.grammar",
    "quantize_model": "tools.quantize",
    "perplexity": "ppl", "PerplexityResult": "ppl",
    "ContinuousBatcher": "continuous_batching", "SequenceEvent": "continuous_batching",
    "LlamaDraftModel": "speculative", "LlamaPromptLookupDecoding": "speculative",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ggml_backend' has no attribute {name!r}")
    import importlib
    target = "LlamaRAMCache" if name == "LlamaCache" else name   # llama-cpp-python's alias
    return getattr(importlib.import_module(f".{module}", __name__), target)


__all__ = ["load", "__version__", *_LAZY]
