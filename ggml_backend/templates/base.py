"""What every chat template is: messages in, one prompt string out, plus the strings that end a reply.

Messages are OpenAI-shaped dicts: ``{"role": "system" | "user" | "assistant" | "tool", "content": str,
"tool_calls": [...]}``. Templates never change the caller's messages; they work on normalized copies.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, Iterable


class TemplateError(ValueError):
    """A chat template cannot be loaded or cannot render the given messages."""


class TemplateSecurityError(TemplateError):
    """A Jinja template tried to reach Python internals (``__class__``, ``__globals__``, ...); nothing was run."""


class TemplateLimitError(TemplateSecurityError):
    """A Jinja template went past a resource limit (render time, output size, a string, number or range too big).

    A subclass of ``TemplateSecurityError``: a template that tries to exhaust time or memory is hostile input as
    much as one that reaches for Python internals. ``limit`` names the limit that was hit."""

    def __init__(self, message: str, limit: str = ""):
        super().__init__(message)
        self.limit = limit


class ChatTemplate(ABC):
    """Turns a list of chat messages into the prompt text a model was trained on."""

    #: short identifier (registry name, file stem, or "jinja")
    name: str = "template"

    @abstractmethod
    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False) -> str:
        """The prompt for ``messages``.

        ``add_generation_prompt`` ends the prompt where the assistant's reply starts;
        ``continue_final_message`` ends it right after the last message's text (that message is then continued).
        """

    @property
    @abstractmethod
    def stop_strings(self) -> list[str]:
        """Text that marks the end of the assistant's turn, for the generator's stop-string matcher."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_KNOWN_ROLES = ("system", "user", "assistant", "tool")


def normalize_messages(messages: Iterable[Any]) -> list[dict]:
    """Validated shallow copies of ``messages``: every one a dict with a known role and string content.

    Tool-call arguments given as a JSON string (the OpenAI wire form) become dicts, as llama.cpp does before
    templating, because templates such as Qwen's write ``arguments | tojson`` and expect an object.
    """
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TemplateError(f"message {index} must be a dict with 'role' and 'content', "
                                f"got {type(message).__name__}")
        role = message.get("role")
        if role not in _KNOWN_ROLES:
            raise TemplateError(f"message {index} has role {role!r}; expected one of {', '.join(_KNOWN_ROLES)}")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            # OpenAI "content parts": only text parts have a meaning for a text model.
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type", "text") == "text")
        elif not isinstance(content, str):
            raise TemplateError(f"message {index} content must be a string, got {type(content).__name__}")
        copy = dict(message)
        copy["content"] = content
        if message.get("tool_calls"):
            copy["tool_calls"] = [_normalize_tool_call(call, index) for call in message["tool_calls"]]
        normalized.append(copy)
    return normalized


def _normalize_tool_call(call: Any, index: int) -> dict:
    if not isinstance(call, dict):
        raise TemplateError(f"message {index}: each tool call must be a dict, got {type(call).__name__}")
    call = dict(call)
    holder = call
    if isinstance(call.get("function"), dict):
        holder = dict(call["function"])
        call["function"] = holder
    arguments = holder.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise TemplateError(f"message {index}: tool call arguments are not valid JSON: {exc}") from None
        holder["arguments"] = parsed
    return call


def tool_call_name_and_arguments(call: dict) -> tuple[str, Any]:
    """(name, arguments) of a normalized tool call, in either the OpenAI or the flat form."""
    holder = call["function"] if isinstance(call.get("function"), dict) else call
    return str(holder.get("name", "")), holder.get("arguments", {})
