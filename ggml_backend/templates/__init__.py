"""Chat templates: chat messages in, the prompt text a model was trained on out.

- ``get_template(name | path | jinja_text)`` and ``list_templates()``: the built-ins (``chatml``, ``gpt4all``,
  ``oobabooga-chatml``, ``llama-2``, ``alpaca``, ``vicuna``, ``textgen-chatml``, ``raw``), text-generation-webui
  YAML files, Jinja files and text.
- ``TextgenTemplate``: text-generation-webui's instruction-template format (user, bot, turn_template, context,
  system_message), rendered as its chat.py did in instruct mode, with continue, impersonate and truncation (its
  chat and chat-instruct modes and characters are the web UI's: ``ggml_webui.chat_modes``).
- ``JinjaTemplate``: GGUF / Hugging Face Jinja templates, rendered only in a sandbox.
- ``parse_tool_calls``, ``ToolCallSplitter``, ``resolve_tool_choice``: tool calls in replies (see tool_calls.py).

Every failure is a ``TemplateError`` (a ``ValueError``); unsafe Jinja raises its subclass ``TemplateSecurityError``,
and Jinja that goes past a time or size limit raises ``TemplateLimitError`` (a ``TemplateSecurityError``).
"""
from .base import ChatTemplate, TemplateError, TemplateLimitError, TemplateSecurityError, normalize_messages
from .builtin import (ChatMLTemplate, RawTemplate, get_template, list_templates, register_template,
                      GPT4ALL_SYSTEM_MESSAGE, TEXTGEN_TEMPLATE_FIELDS)
from .jinja import JinjaTemplate
from .textgen import TextgenTemplate, TurnPieces, assemble_prompt, messages_to_history
from .tool_calls import ToolCallSplitter, parse_tool_calls, resolve_tool_choice

__all__ = [
    "ChatTemplate", "TemplateError", "TemplateLimitError", "TemplateSecurityError", "normalize_messages",
    "ChatMLTemplate", "RawTemplate", "get_template", "list_templates", "register_template",
    "GPT4ALL_SYSTEM_MESSAGE", "TEXTGEN_TEMPLATE_FIELDS",
    "JinjaTemplate",
    "TextgenTemplate", "TurnPieces", "assemble_prompt", "messages_to_history",
    "parse_tool_calls", "ToolCallSplitter", "resolve_tool_choice",
]
