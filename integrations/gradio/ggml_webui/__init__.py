"""A text-generation-webui-style web chat for ggml_backend models (Gradio).

``build_app(model=None | path | Llama) -> gr.Blocks`` builds the page; ``launch(...)`` serves it (127.0.0.1 by
default). ``ggml-backend webui`` is the command-line way in. ``load_character(path)`` reads a character: a
text-generation-webui YAML, a TavernAI/SillyTavern JSON card or a PNG card.
"""
from .app import build_app, launch
from .characters import CardError, CharacterCard, load_character

__all__ = ["build_app", "launch", "load_character", "CharacterCard", "CardError"]
