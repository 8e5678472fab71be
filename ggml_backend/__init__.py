"""ggml_backend: pure-Python (numpy + numba) inference for quantized Llama-family models in GGML and GGUF files."""
from .formats import load

__all__ = ["load"]
