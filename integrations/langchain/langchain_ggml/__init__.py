"""LangChain integration for ggml_backend: ``GGMLLLM`` (text completion), ``ChatGGML`` (chat, tool calling) and
``GGMLEmbeddings`` (text embeddings).

All three load a GGUF/GGML model file with ggml_backend (the default Qwen2.5-Coder-0.5B-Instruct when ``model_path`` is
None) once per process and share it between instances.
"""
from importlib import metadata

from langchain_ggml._shared import clear_model_cache
from langchain_ggml.chat_models import ChatGGML, convert_messages
from langchain_ggml.embeddings import GGMLEmbeddings
from langchain_ggml.llms import GGMLLLM

try:
    __version__ = metadata.version("ggml-backend")
except metadata.PackageNotFoundError:
    __version__ = ""

__all__ = ["ChatGGML", "GGMLEmbeddings", "GGMLLLM", "clear_model_cache", "convert_messages", "__version__"]
