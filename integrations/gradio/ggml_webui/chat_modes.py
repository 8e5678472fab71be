"""text-generation-webui's chat modes and characters, on the engine's instruction templates.

The engine renders instruct mode only (``ggml_backend.templates.TextgenTemplate``); the web UI is the one user of
textgen's other two modes, so they live here, written as its ``modules/chat.py`` of late 2023 did them:

- "chat": a character's context, then ``name1: message`` / ``name2: message`` lines (``CHAT_TURN_TEMPLATE``);
- "chat-instruct": that chat wrapped inside an instruction, the "command for chat-instruct mode"
  (``DEFAULT_CHAT_INSTRUCT_COMMAND``, ``<|character|>`` being the character's name and ``<|prompt|>`` the chat).

``build_prompt`` and ``stopping_strings`` take the mode; "instruct" goes straight to the template.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ggml_backend.templates import TemplateError, TextgenTemplate
from ggml_backend.templates.textgen import USER_MESSAGE, TurnPieces, assemble_prompt, read_mapping

#: the fixed turn shape of "chat" mode, names taken from the character
CHAT_TURN_TEMPLATE = "<|user|>: <|user-message|>\n<|bot|>: <|bot-message|>\n"
#: text-generation-webui's default "Command for chat-instruct mode"
DEFAULT_CHAT_INSTRUCT_COMMAND = ('Continue the chat dialogue below. Write a single reply for the character '
                                 '"<|character|>".\n\n<|prompt|>')
#: the user text that marks a greeting-only row in a chat history (never rendered)
BEGIN_VISIBLE_CHAT = "<|BEGIN-VISIBLE-CHAT|>"

MODES = ("instruct", "chat", "chat-instruct")


def replace_character_names(text: str, user_name: str, bot_name: str) -> str:
    """The character-card placeholders ``{{user}}``/``<USER>`` and ``{{char}}``/``<BOT>``."""
    text = text.replace("{{user}}", user_name).replace("{{char}}", bot_name)
    return text.replace("<USER>", user_name).replace("<BOT>", bot_name)


@dataclass(frozen=True)
class Character:
    """A text-generation-webui character (``characters/*.yaml``) for "chat" and "chat-instruct" modes."""
    name: str = "AI"                       # name2, the bot
    context: str = ("The following is a conversation with an AI Large Language Model. The AI has been trained to "
                    "answer questions, provide recommendations, and help with decision making. The AI follows user "
                    "requests. The AI thinks outside the box.\n")
    greeting: str = "How can I help you today?"
    user_name: str = "You"                 # name1, the person chatting

    @classmethod
    def from_dict(cls, data: dict, user_name: str = "You") -> "Character":
        if not isinstance(data, dict):
            raise TemplateError(f"a character must be a mapping, got {type(data).__name__}")
        name = next((str(data[k]) for k in ("name", "bot", "<|bot|>", "char_name") if data.get(k)), "")
        user_name = next((str(data[k]) for k in ("your_name", "user", "<|user|>") if data.get(k)), user_name)
        if "context" in data:
            context = str(data["context"] or "").strip() + "\n"
        else:  # Pygmalion-style card
            parts = []
            if data.get("char_persona"):
                parts.append(f"{data.get('char_name', name)}'s Persona: {data['char_persona']}\n")
            if data.get("world_scenario"):
                parts.append(f"Scenario: {data['world_scenario']}\n")
            if data.get("example_dialogue"):
                parts.append(f"{str(data['example_dialogue']).strip()}\n")
            context = "".join(parts).strip() + "\n"
        greeting = str(data.get("greeting", data.get("char_greeting", "")) or "")
        return cls(name=name, context=context, greeting=greeting, user_name=user_name)

    @classmethod
    def load(cls, path, user_name: str = "You") -> "Character":
        return cls.from_dict(read_mapping(Path(path)), user_name=user_name)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TemplateError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def build_prompt(template: TextgenTemplate, history: Sequence[Sequence[str]], user_input: str = "", *,
                 mode: str = "instruct", system_message: str | None = None, character: Character | None = None,
                 chat_instruct_command: str = DEFAULT_CHAT_INSTRUCT_COMMAND, continue_: bool = False,
                 impersonate: bool = False, add_generation_prompt: bool = True,
                 max_prompt_tokens: int | None = None, count_tokens: Callable[[str], int] | None = None) -> str:
    """chat.py's ``generate_chat_prompt`` in any of textgen's modes, on a history of ``[user message, bot reply]``
    pairs (a ``BEGIN_VISIBLE_CHAT`` user side marks a greeting, whose user side is not rendered)."""
    _check_mode(mode)
    if mode == "chat-instruct" and not add_generation_prompt:
        raise TemplateError("chat-instruct mode always ends where the reply starts")
    # the engine's rows skip an empty user side; the greeting marker is the web UI's spelling of one
    history = [("" if str(pair[0]) == BEGIN_VISIBLE_CHAT else str(pair[0]), str(pair[1])) for pair in history]
    if mode == "instruct":
        return template.build_prompt(history, user_input, system_message=system_message, continue_=continue_,
                                     impersonate=impersonate, add_generation_prompt=add_generation_prompt,
                                     max_prompt_tokens=max_prompt_tokens, count_tokens=count_tokens)
    if continue_ and impersonate:
        raise TemplateError("continue and impersonate cannot be combined")
    if continue_ and not history:
        raise TemplateError("continue needs a history whose last reply is continued")
    character = character or Character()
    name1, name2 = character.user_name, character.name
    instruct = template.instruct_pieces()
    pieces = TurnPieces.from_template(CHAT_TURN_TEMPLATE, name1, name2)
    wrapper = None
    if mode == "chat-instruct":
        command = chat_instruct_command.replace("<|character|>", name1 if impersonate else name2)
        wrapper = (template.filled_context(system_message) + instruct.user_turn.replace(USER_MESSAGE, command)
                   + instruct.bot_prefix)
        if impersonate:
            wrapper += pieces.user_prefix.rstrip(" ")
        elif continue_:
            wrapper += pieces.bot_prefix + history[-1][1]
        else:
            wrapper += pieces.bot_prefix.rstrip(" ")
    context = replace_character_names(character.context.strip() + "\n", name1, name2)
    return assemble_prompt(pieces, context, history, user_input, wrapper=wrapper, continue_=continue_,
                           impersonate=impersonate, add_generation_prompt=add_generation_prompt,
                           max_prompt_tokens=max_prompt_tokens, count_tokens=count_tokens)


def stopping_strings(template: TextgenTemplate, mode: str = "instruct",
                     character: Character | None = None) -> list[str]:
    """chat.py's ``get_stopping_strings``: the text that would open the next turn in ``mode``."""
    _check_mode(mode)
    strings = template.stopping_strings() if mode in ("instruct", "chat-instruct") else []
    if mode in ("chat", "chat-instruct"):
        character = character or Character()
        strings += [f"\n{character.user_name}:", f"\n{character.name}:"]
    return strings


__all__ = ["BEGIN_VISIBLE_CHAT", "CHAT_TURN_TEMPLATE", "DEFAULT_CHAT_INSTRUCT_COMMAND", "MODES", "Character",
           "build_prompt", "replace_character_names", "stopping_strings"]
