"""text-generation-webui's instruction templates (``user``, ``bot``, ``turn_template``, ``context``, ``system_message``).

The rendering follows text-generation-webui's ``modules/chat.py`` of late 2023 (the last version before it moved to
Jinja), piece for piece, so a template written for that UI gives the same prompt here:

- ``turn_template`` holds ``<|user|>``, ``<|user-message|>``, ``<|bot|>``, ``<|bot-message|>``; a literal
  backslash-n (as in a one-line YAML field) means a newline. The part before ``<|bot|>`` is the user turn, the rest
  the bot turn; the "stripped" forms stop where the message would start.
- ``context`` opens the prompt, with ``<|system-message|>`` replaced by the conversation's system message when it is
  not blank, else by the template's ``system_message``.
- The prompt ends with the bot prefix with trailing spaces removed (``rstrip(' ')``), or, for "continue", right after
  the last reply's text, or, for "impersonate", where the next user message would start.
- With a token budget, history is added newest first while the prompt is under budget, then rows are dropped from
  the oldest end until it fits, never the context and never the newest turn.

This is instruct mode, what the engine's chat API renders. text-generation-webui's other modes ("chat": a
character's ``name1: message`` / ``name2: message`` lines; "chat-instruct": that chat wrapped in an instruction)
and its characters live with their only user, the web UI (``integrations/gradio/ggml_webui/chat_modes.py``), and
build on ``TurnPieces`` and ``assemble_prompt`` here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import yaml

from .base import ChatTemplate, TemplateError, normalize_messages

USER, USER_MESSAGE, BOT, BOT_MESSAGE = "<|user|>", "<|user-message|>", "<|bot|>", "<|bot-message|>"
SYSTEM_MESSAGE = "<|system-message|>"

#: used when a template has an empty turn_template (chat.py's fallback)
DEFAULT_INSTRUCT_TURN_TEMPLATE = "<|user|>\n<|user-message|>\n<|bot|>\n<|bot-message|>\n"
#: where the rows go in a wrapper (chat-instruct's command); the bare wrapper is the prompt itself
PROMPT_SLOT = "<|prompt|>"

# Markers that, found right after <|bot-message|>, end a reply as text when the tokenizer prints special tokens.
_END_OF_TURN_MARKERS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|EOT|>")


def replace_all(text: str, replacements: dict[str, str]) -> str:
    # In order, one after the other, as text-generation-webui's utils.replace_all.
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class TurnPieces:
    """The four substrings chat.py cuts a turn template into, names already filled in."""
    user_turn: str      # user turn with <|user-message|> still in it
    bot_turn: str       # bot turn with <|bot-message|> still in it
    user_prefix: str    # user turn up to where the message starts ("user_turn_stripped")
    bot_prefix: str     # bot turn up to where the message starts ("bot_turn_stripped")

    @classmethod
    def from_template(cls, template: str, user_name: str, bot_name: str) -> "TurnPieces":
        template = template.replace(r"\n", "\n")
        before_bot, after_bot = template.split(BOT)[0], template.split(BOT)[1]
        names = {USER: user_name.strip(), BOT: bot_name.strip()}
        return cls(
            user_turn=replace_all(before_bot, names),
            bot_turn=replace_all(BOT + after_bot, names),
            user_prefix=replace_all(before_bot.split(USER_MESSAGE)[0], names),
            bot_prefix=replace_all(BOT + after_bot.split(BOT_MESSAGE)[0], names),
        )


def read_mapping(path: Path) -> dict:
    """A YAML (or, for .json, JSON) file's top-level mapping; anything else is a TemplateError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read template file {path}: {exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise TemplateError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") \
            from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: expected a mapping of template fields, got {type(data).__name__}")
    return data


class _TextgenDumper(yaml.SafeDumper):
    """Writes multi-line strings as ``|`` blocks, as text-generation-webui's saved templates do."""


def _represent_str(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_TextgenDumper.add_representer(str, _represent_str)

_FIELDS = ("user", "bot", "turn_template", "context", "system_message")


class TextgenTemplate(ChatTemplate):
    """An instruction template in text-generation-webui's format.

    ``turn_template`` is kept in the one-line form text-generation-webui kept in its settings (real newlines written
    as ``\\n``), so saving and loading again gives back the same five strings.
    """

    def __init__(self, user: str = "", bot: str = "", turn_template: str = "", context: str = "",
                 system_message: str = "", *, name: str = "textgen", extra_stop_strings: Sequence[str] = ()):
        for field, value in zip(_FIELDS, (user, bot, turn_template, context, system_message)):
            if not isinstance(value, str):
                raise TemplateError(f"template field {field!r} must be a string, got {type(value).__name__}")
        self.user = user
        self.bot = bot
        self.turn_template = turn_template.replace("\n", r"\n")
        self.context = context
        self.system_message = system_message
        self.name = name
        self.extra_stop_strings = tuple(extra_stop_strings)
        template = self.effective_turn_template
        for marker in (USER_MESSAGE, BOT, BOT_MESSAGE):
            if marker not in template:
                raise TemplateError(f"turn_template {turn_template!r} lacks {marker}")
        if template.index(BOT) > template.index(BOT_MESSAGE):
            raise TemplateError(f"turn_template {turn_template!r} has {BOT_MESSAGE} before {BOT}")

    # ---- the five strings, in and out -------------------------------------------------------------------------

    @property
    def effective_turn_template(self) -> str:
        return self.turn_template or DEFAULT_INSTRUCT_TURN_TEMPLATE.replace("\n", r"\n")

    def fields(self) -> dict[str, str]:
        return {field: getattr(self, field) for field in _FIELDS}

    def __eq__(self, other) -> bool:
        return isinstance(other, TextgenTemplate) and self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash(tuple(self.fields().values()))

    @classmethod
    def from_dict(cls, data: dict, *, name: str = "textgen") -> "TextgenTemplate":
        if not isinstance(data, dict):
            raise TemplateError(f"an instruction template must be a mapping, got {type(data).__name__}")
        # The keys chat.py's load_character accepted, the older "<|user|>"/"<|bot|>" spellings included.
        bot = next((data[k] for k in ("name", "bot", "<|bot|>", "char_name") if data.get(k)), "")
        user = next((data[k] for k in ("your_name", "user", "<|user|>") if data.get(k)), "")
        values = {"user": user, "bot": bot, "turn_template": data.get("turn_template") or "",
                  "context": data.get("context") or "", "system_message": data.get("system_message") or ""}
        for field, value in values.items():
            if not isinstance(value, str):
                raise TemplateError(f"template {name!r}: field {field!r} must be a string, "
                                    f"got {type(value).__name__}")
        return cls(**values, name=name)

    @classmethod
    def from_yaml(cls, text: str, *, name: str = "textgen") -> "TextgenTemplate":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TemplateError(f"template {name!r} is not valid YAML: {exc}") from None
        return cls.from_dict(data, name=name)

    @classmethod
    def load(cls, path) -> "TextgenTemplate":
        """A template file of text-generation-webui's ``instruction-templates/`` folder (.yaml, .yml or .json)."""
        path = Path(path)
        return cls.from_dict(read_mapping(path), name=path.stem)

    def to_yaml(self) -> str:
        """The template in the form text-generation-webui saves (empty fields left out)."""
        data = {field: value for field, value in self.fields().items() if value}
        return yaml.dump(data, Dumper=_TextgenDumper, sort_keys=False, width=float("inf"))

    def save(self, path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    # ---- rendering ----------------------------------------------------------------------------------------------

    def instruct_pieces(self) -> TurnPieces:
        return TurnPieces.from_template(self.effective_turn_template, self.user, self.bot)

    def filled_context(self, system_message: str | None = None) -> str:
        """``context`` with ``<|system-message|>`` replaced (a blank conversation system message is ignored)."""
        chosen = system_message if system_message is not None and system_message.strip() != "" \
            else self.system_message
        return self.context.replace(SYSTEM_MESSAGE, chosen)

    def build_prompt(self, history: Sequence[Sequence[str]], user_input: str = "", *,
                     system_message: str | None = None, continue_: bool = False, impersonate: bool = False,
                     add_generation_prompt: bool = True, max_prompt_tokens: int | None = None,
                     count_tokens: Callable[[str], int] | None = None) -> str:
        """chat.py's ``generate_chat_prompt`` in instruct mode, on a history of ``[user message, bot reply]``
        pairs (a pair with an empty user side is a greeting: only its reply is rendered).

        ``user_input`` is the new user message (added after the history unless continuing or impersonating).
        ``max_prompt_tokens`` with ``count_tokens`` enables truncation of the oldest rows.
        """
        return assemble_prompt(self.instruct_pieces(), self.filled_context(system_message), history, user_input,
                               continue_=continue_, impersonate=impersonate,
                               add_generation_prompt=add_generation_prompt, max_prompt_tokens=max_prompt_tokens,
                               count_tokens=count_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False, impersonate: bool = False,
               max_prompt_tokens: int | None = None, count_tokens: Callable[[str], int] | None = None) -> str:
        """The prompt for OpenAI-style messages, converted to a history as text-generation-webui's API did.

        The last system message fills ``<|system-message|>``; a trailing user message is the new input (for
        ``impersonate`` it is the user's partial text, appended after the prompt as the UI did).
        """
        if tools:
            raise TemplateError(f"template {self.name!r} has no format for tools; use a Jinja chat template")
        messages = normalize_messages(messages)
        system_message, history, user_input = messages_to_history(messages, self.name)
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise TemplateError("continue_final_message needs an assistant message last")
        prompt = self.build_prompt(history, "" if impersonate else user_input,
                                   system_message=system_message, continue_=continue_final_message,
                                   impersonate=impersonate, add_generation_prompt=add_generation_prompt,
                                   max_prompt_tokens=max_prompt_tokens, count_tokens=count_tokens)
        return prompt + user_input if impersonate else prompt

    # ---- where a reply ends ---------------------------------------------------------------------------------

    def stopping_strings(self) -> list[str]:
        """chat.py's ``get_stopping_strings`` in instruct mode: the text that would open the next turn."""
        template = self.effective_turn_template
        names = {USER: self.user, BOT: self.bot}
        return [replace_all(raw, names).rstrip(" ").replace(r"\n", "\n")
                for raw in (template.split(USER_MESSAGE)[1].split(BOT)[0] + BOT, template.split(BOT_MESSAGE)[1] + USER)]

    @property
    def stop_strings(self) -> list[str]:
        """text-generation-webui's instruct stopping strings, plus the end-of-turn marker written after a reply
        (``</s>``, ``<|im_end|>``...) and a newline followed by the user prefix (``\\nUSER:``)."""
        found = self.stopping_strings()
        after_reply = self.effective_turn_template.replace(r"\n", "\n").split(BOT_MESSAGE)[1].strip()
        found += [marker for marker in _END_OF_TURN_MARKERS if after_reply.startswith(marker)]
        user_prefix = self.instruct_pieces().user_prefix.strip()
        if user_prefix:
            found.append("\n" + user_prefix)
        found += self.extra_stop_strings
        return [s for i, s in enumerate(found) if s and s not in found[:i]]


def assemble_prompt(pieces: TurnPieces, context: str, history: Sequence[Sequence[str]], user_input: str = "", *,
                    wrapper: str | None = None, continue_: bool = False, impersonate: bool = False,
                    add_generation_prompt: bool = True, max_prompt_tokens: int | None = None,
                    count_tokens: Callable[[str], int] | None = None) -> str:
    """The rows of text-generation-webui's ``generate_chat_prompt``: ``context``, the history's turns cut
    from ``pieces`` (newest first while under ``max_prompt_tokens``), the new user turn and the bot prefix,
    then the oldest rows dropped until the prompt fits (never the context, never the newest turn); the rows
    are the prompt, or go where ``wrapper`` has ``<|prompt|>``.

    A ``wrapper`` (the web UI's chat-instruct command) ends where the reply starts by itself, so the rows then
    carry no bot prefix, no continued reply and no impersonation prefix."""
    if continue_ and impersonate:
        raise TemplateError("continue and impersonate cannot be combined")
    if continue_ and not history:
        raise TemplateError("continue needs a history whose last reply is continued")
    wrapped = wrapper is not None
    if not wrapped:
        wrapper = PROMPT_SLOT
    if wrapped and not add_generation_prompt:
        raise TemplateError("a wrapped prompt (chat-instruct) always ends where the reply starts")
    if max_prompt_tokens is not None and count_tokens is None:
        raise TemplateError("max_prompt_tokens needs a count_tokens(str) -> int callable")
    history = [(str(pair[0]), str(pair[1])) for pair in history]

    def too_long(rows: list[str]) -> bool:
        if max_prompt_tokens is None:
            return False
        return count_tokens(wrapper.replace(PROMPT_SLOT, "".join(rows))) >= max_prompt_tokens

    rows = [context]
    min_rows = 3
    i = len(history) - 1
    while i >= 0 and not too_long(rows):
        user_message, bot_reply = history[i]
        if continue_ and i == len(history) - 1:
            if not wrapped:
                rows.insert(1, pieces.bot_prefix + bot_reply.strip())
        else:
            rows.insert(1, pieces.bot_turn.replace(BOT_MESSAGE, bot_reply.strip()))
        if user_message:
            rows.insert(1, replace_all(pieces.user_turn, {USER_MESSAGE: user_message.strip(),
                                                          "<|round|>": str(i)}))
        i -= 1

    if impersonate:
        if wrapped:
            min_rows = 1
        else:
            min_rows = 2
            rows.append(pieces.user_prefix.rstrip(" "))
    elif not continue_:
        if len(user_input) > 0:
            rows.append(replace_all(pieces.user_turn, {USER_MESSAGE: user_input.strip(),
                                                       "<|round|>": str(len(history))}))
        if not wrapped and add_generation_prompt:
            rows.append(pieces.bot_prefix.rstrip(" "))

    while len(rows) > min_rows and too_long(rows):
        rows.pop(1)

    return wrapper.replace(PROMPT_SLOT, "".join(rows))


def messages_to_history(messages: list[dict], template_name: str = "textgen") -> tuple[str | None, list, str]:
    """(system message, [[user, reply], ...], pending user message) from normalized messages.

    As text-generation-webui's OpenAI-compatible API: a user message without a reply before another user message
    becomes a pair with an empty reply; an assistant message without a user message (a greeting) a pair with an
    empty user side, which is not rendered.
    """
    system_message = None
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system_message = content
        elif role == "user":
            if pending_user is not None:
                history.append((pending_user, ""))
            pending_user = content
        elif role == "assistant":
            if message.get("tool_calls"):
                raise TemplateError(f"template {template_name!r} has no format for tool calls")
            history.append((pending_user or "", content))
            pending_user = None
        else:
            raise TemplateError(f"template {template_name!r} has no format for {role!r} messages")
    return system_message, history, pending_user or ""
