"""A text-generation-webui-style web chat for ggml_backend models (Gradio).

``build_app(model=None | path | Llama) -> gr.Blocks`` builds the page; ``launch(...)`` serves it (127.0.0.1 by
default). ``ggml-backend webui`` is the command-line way in.
"""
from .app import build_app, launch

__all__ = ["build_app", "launch"]
