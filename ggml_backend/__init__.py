"""ggml_backend: pure-Python (numpy + numba) inference for quantized Llama-family models in GGML and GGUF files."""
from .formats import load


def __getattr__(name):
    # Llama pulls in numba; import it on first use so ``ggml_backend.load`` and ``ggml-backend info`` stay light.
    if name == "Llama":
        from .api import Llama
        return Llama
    if name == "LlamaRAMCache":
        from .prompt_cache import LlamaRAMCache
        return LlamaRAMCache
    raise AttributeError(f"module 'ggml_backend' has no attribute {name!r}")


__all__ = ["load", "Llama", "LlamaRAMCache"]
