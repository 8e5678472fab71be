"""The built-in templates, the registry of their names, and ``get_template`` (name, file, or Jinja text).

``alpaca``, ``vicuna``, ``llama-2`` and ``textgen-chatml`` are text-generation-webui's instruction templates of late
2023 (Alpaca.yaml, Vicuna-v1.1.yaml, Llama-v2.yaml, ChatML.yaml), field for field, rendered by ``TextgenTemplate``.
``chatml`` is role-generic ChatML with Qwen2.5's conventions for tools; ``gpt4all`` is the same with the Alpaca
system message as default (the seed model's variant); ``oobabooga-chatml`` is that variant written as a
text-generation-webui template (user ``<|im_start|>user``, bot ``<|im_start|>assistant``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import ChatTemplate, TemplateError, normalize_messages, tool_call_name_and_arguments
from .jinja import JinjaTemplate, tojson
from .textgen import TextgenTemplate

ALPACA_SYSTEM_MESSAGE = ("Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.")
VICUNA_SYSTEM_MESSAGE = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                         "gives helpful, detailed, and polite answers to the user's questions.")
GPT4ALL_SYSTEM_MESSAGE = ALPACA_SYSTEM_MESSAGE

# text-generation-webui's instruction-templates/*.yaml of late 2023 (the era with system_message), verbatim.
TEXTGEN_TEMPLATE_FIELDS: dict[str, dict[str, str]] = {
    "alpaca": {
        "user": "### Instruction:",
        "bot": "### Response:",
        "turn_template": "<|user|>\n<|user-message|>\n\n<|bot|>\n<|bot-message|>\n\n",
        "context": "<|system-message|>\n\n",
        "system_message": ALPACA_SYSTEM_MESSAGE,
    },
    "vicuna": {
        "user": "USER:",
        "bot": "ASSISTANT:",
        "turn_template": "<|user|> <|user-message|>\n<|bot|> <|bot-message|></s>\n",
        "context": "<|system-message|>\n\n",
        "system_message": VICUNA_SYSTEM_MESSAGE,
    },
    "llama-2": {
        "user": "",
        "bot": "",
        "turn_template": "<|user|><|user-message|> [/INST] <|bot|><|bot-message|> </s><s>[INST] ",
        "context": "[INST] <<SYS>>\n<|system-message|>\n<</SYS>>\n\n",
        "system_message": "Answer the questions.",
    },
    "textgen-chatml": {
        "user": "user",
        "bot": "assistant",
        "turn_template": r"<|im_start|><|user|>\n<|user-message|><|im_end|>\n<|im_start|><|bot|>\n<|bot-message|><|im_end|>\n",
        "context": "<|im_start|>system\n<|system-message|><|im_end|>\n",
        "system_message": "",
    },
    "oobabooga-chatml": {
        "user": "<|im_start|>user",
        "bot": "<|im_start|>assistant",
        "turn_template": r"<|user|>\n<|user-message|><|im_end|>\n<|bot|>\n<|bot-message|><|im_end|>\n",
        "context": "<|im_start|>system\n<|system-message|><|im_end|>\n",
        "system_message": GPT4ALL_SYSTEM_MESSAGE,
    },
}

# Text a model may print when it ends its turn without the tokenizer's end-of-generation token.
_EXTRA_STOP_STRINGS = {"alpaca": ("</s>",)}

_TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


class ChatMLTemplate(ChatTemplate):
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, ``<|im_start|>assistant\\n`` to reply.

    Tools, assistant tool calls and tool results are written as Qwen2.5's template writes them (a "# Tools"
    section in the system turn, ``<tool_call>`` JSON, ``<tool_response>`` blocks grouped in one user turn).
    """

    def __init__(self, default_system_message: str | None = None, name: str = "chatml"):
        self.default_system_message = default_system_message
        self.name = name

    @property
    def stop_strings(self) -> list[str]:
        return ["<|im_end|>"]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False) -> str:
        messages = normalize_messages(messages)
        if continue_final_message and not messages:
            raise TemplateError("continue_final_message needs at least one message")
        has_system = bool(messages) and messages[0]["role"] == "system"
        system_text = messages[0]["content"] if has_system else self.default_system_message
        parts = []
        if tools:
            head = system_text + "\n\n" if system_text is not None else ""
            tool_lines = "".join("\n" + tojson(tool) for tool in tools)
            parts.append(f"<|im_start|>system\n{head}{_TOOLS_PREAMBLE}{tool_lines}{_TOOLS_POSTAMBLE}<|im_end|>\n")
        elif system_text is not None:
            parts.append(f"<|im_start|>system\n{system_text}<|im_end|>\n")

        last = len(messages) - 1
        for index, message in enumerate(messages):
            if index == 0 and has_system:
                continue
            role, content = message["role"], message["content"]
            if continue_final_message and index == last:
                if role == "tool" or message.get("tool_calls"):
                    raise TemplateError("continue_final_message cannot continue a tool call or tool result")
                parts.append(f"<|im_start|>{role}\n{content}")
                continue
            if role == "tool":
                if index == 0 or messages[index - 1]["role"] != "tool":
                    parts.append("<|im_start|>user")
                parts.append(f"\n<tool_response>\n{content}\n</tool_response>")
                if index == last or messages[index + 1]["role"] != "tool":
                    parts.append("<|im_end|>\n")
            elif role == "assistant" and message.get("tool_calls"):
                parts.append("<|im_start|>assistant")
                if content:
                    parts.append("\n" + content)
                for call in message["tool_calls"]:
                    call_name, arguments = tool_call_name_and_arguments(call)
                    parts.append(f'\n<tool_call>\n{{"name": "{call_name}", "arguments": {tojson(arguments)}}}'
                                 "\n</tool_call>")
                parts.append("<|im_end|>\n")
            else:
                parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        if add_generation_prompt and not continue_final_message:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


class RawTemplate(ChatTemplate):
    """No template: the messages' contents, concatenated as they are."""

    name = "raw"

    @property
    def stop_strings(self) -> list[str]:
        return []

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False) -> str:
        if tools:
            raise TemplateError("the raw template has no format for tools")
        return "".join(message["content"] for message in normalize_messages(messages))


class FormatTemplate(ChatTemplate):
    """A chat format as llama-cpp-python's ``llama_chat_format.py`` writes it (``chat_format="llama-3"`` and the
    like): a function of the message list, and the format's stop strings. No tools (the format has no way to
    describe them)."""

    def __init__(self, name: str, format_fn: Callable[[list[dict]], str], stops: tuple[str, ...]):
        self.name = name
        self._format = format_fn
        self._stops = tuple(stops)

    @property
    def stop_strings(self) -> list[str]:
        return list(self._stops)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False) -> str:
        if tools:
            raise TemplateError(f"the {self.name!r} chat format has no format for tools")
        if continue_final_message or not add_generation_prompt:
            raise TemplateError(f"the {self.name!r} chat format always ends with the assistant's turn opened")
        return self._format(normalize_messages(messages))


def _system_message(messages: list[dict]) -> str:
    """The first system message's text ('' without one), as llama-cpp-python's _get_system_message."""
    return next((m["content"] or "" for m in messages if m["role"] == "system"), "")


def _turns(messages: list[dict], roles: dict[str, str]) -> list[tuple[str, str | None]]:
    """(role prefix, content) for the messages whose role the format knows, then the assistant's open turn."""
    return [(roles[m["role"]], m["content"]) for m in messages if m["role"] in roles] + [(roles["assistant"], None)]


def _no_colon_single(system: str, turns, sep: str) -> str:
    return system + "".join(role + content + sep if content else role for role, content in turns)


def _chatml_style(system: str, turns, sep: str) -> str:
    head = "" if system == "" else system + sep + "\n"
    return head + "".join(role + "\n" + content + sep + "\n" if content else role + "\n" for role, content in turns)


def _format_llama3(messages: list[dict]) -> str:
    roles = {r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ("system", "user", "assistant")}
    return _no_colon_single("", _turns(messages, roles), "<|eot_id|>")


def _format_mistral_instruct(messages: list[dict]) -> str:
    prompt = ""
    for m in messages:
        if m["role"] == "user":
            prompt += "[INST] " + m["content"]
        elif m["role"] == "assistant":
            prompt += " [/INST]" + m["content"] + "</s>"
    return prompt + " [/INST]"


def _format_gemma(messages: list[dict]) -> str:
    roles = {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"}
    return _no_colon_single("", _turns(messages, roles), "<end_of_turn>\n")


def _format_qwen(messages: list[dict]) -> str:
    system = "<|im_start|>system\n" + (_system_message(messages) or "You are a helpful assistant.")
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    return _chatml_style(system, _turns(messages, roles), "<|im_end|>")


def _format_zephyr(messages: list[dict]) -> str:
    system = "<|system|>\n" + _system_message(messages)
    roles = {"user": "<|user|>\n", "assistant": "<|assistant|>\n"}
    return _chatml_style(system, _turns(messages, roles), "</s>")


def _format_phi3(messages: list[dict]) -> str:
    # Phi-3's own chat template (llama-cpp-python has no "phi-3" format; the model file's template is this one)
    return "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages
                   if m["role"] in ("system", "user", "assistant")) + "<|assistant|>\n"


# llama-cpp-python's chat_format names: (formatter, stop strings as llama-cpp-python's ChatFormatterResponse)
LLAMA_CPP_FORMATS: dict[str, tuple[Callable[[list[dict]], str], tuple[str, ...]]] = {
    "llama-3": (_format_llama3, ("<|eot_id|>",)),
    "mistral-instruct": (_format_mistral_instruct, ("</s>",)),
    "gemma": (_format_gemma, ("<end_of_turn>\n",)),
    "qwen": (_format_qwen, ("<|endoftext|>",)),
    "zephyr": (_format_zephyr, ("</s>",)),
    "phi-3": (_format_phi3, ("<|end|>",)),
}


def _format_builtin(name: str) -> Callable[[], FormatTemplate]:
    return lambda: FormatTemplate(name, *LLAMA_CPP_FORMATS[name])


def _textgen_builtin(name: str) -> Callable[[], TextgenTemplate]:
    return lambda: TextgenTemplate(**TEXTGEN_TEMPLATE_FIELDS[name], name=name,
                                   extra_stop_strings=_EXTRA_STOP_STRINGS.get(name, ()))


_REGISTRY: dict[str, Callable[[], ChatTemplate]] = {
    "chatml": lambda: ChatMLTemplate(),
    "gpt4all": lambda: ChatMLTemplate(default_system_message=GPT4ALL_SYSTEM_MESSAGE, name="gpt4all"),
    "oobabooga-chatml": _textgen_builtin("oobabooga-chatml"),
    "llama-2": _textgen_builtin("llama-2"),
    "alpaca": _textgen_builtin("alpaca"),
    "vicuna": _textgen_builtin("vicuna"),
    "textgen-chatml": _textgen_builtin("textgen-chatml"),
    "raw": RawTemplate,
    # plain ChatML when rendered as a template; create_chat_completion runs its tool protocol (function_calling.py)
    "chatml-function-calling": lambda: ChatMLTemplate(name="chatml-function-calling"),
    **{name: _format_builtin(name) for name in LLAMA_CPP_FORMATS},
}

# Other spellings, text-generation-webui's file names among them.
_ALIASES = {"llama3": "llama-3", "phi3": "phi-3", "mistral": "mistral-instruct", "llama2": "llama-2", "llama-v2": "llama-2", "vicuna-v1.1": "vicuna", "none": "raw"}


def list_templates() -> list[str]:
    """Names of the built-in templates."""
    return list(_REGISTRY)


def register_template(name: str, factory: Callable[[], ChatTemplate]) -> None:
    """Make ``get_template(name)`` return ``factory()``; names are case-insensitive."""
    key = name.lower()
    if key in _REGISTRY or key in _ALIASES:
        raise TemplateError(f"a template named {name!r} is already registered")
    _REGISTRY[key] = factory


def get_template(spec, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """A template from a built-in name, a file, or Jinja source text.

    Files: ``.yaml``/``.yml`` (text-generation-webui instruction template), ``.json`` (a Hugging Face
    ``tokenizer_config.json`` with ``chat_template``, else a text-generation-webui template), anything else is read
    as Jinja source. ``bos_token``/``eos_token`` are passed to Jinja templates.
    """
    if isinstance(spec, ChatTemplate):
        return spec
    if isinstance(spec, Path):
        return _template_from_file(spec, bos_token, eos_token)
    if not isinstance(spec, str):
        raise TemplateError(f"a chat template is a name, a path or Jinja text, got {type(spec).__name__}")
    key = spec.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]()
    if "{%" in spec or "{{" in spec:
        return JinjaTemplate(spec, bos_token=bos_token, eos_token=eos_token)
    if "\n" not in spec and len(spec) < 4096:
        try:
            path = Path(spec).expanduser()
            is_file = path.is_file()
        except (OSError, ValueError):
            is_file = False
        if is_file:
            return _template_from_file(path, bos_token, eos_token)
    raise TemplateError(f"unknown chat template {spec!r}: not a built-in ({', '.join(list_templates())}), "
                        "not a file, and not Jinja text")


def _template_from_file(path: Path, bos_token: str, eos_token: str) -> ChatTemplate:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return TextgenTemplate.load(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read chat template file {path}: {exc}") from None
    if suffix == ".json":
        import json
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TemplateError(f"{path}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and "chat_template" in data:
            return _jinja_from_tokenizer_config(data, path, bos_token, eos_token)
        return TextgenTemplate.load(path)
    return JinjaTemplate(text, bos_token=bos_token, eos_token=eos_token, name=path.stem)


def _jinja_from_tokenizer_config(data: dict, path: Path, bos_token: str, eos_token: str) -> JinjaTemplate:
    source = data["chat_template"]
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        source = named.get("default")
    if not isinstance(source, str):
        raise TemplateError(f"{path}: chat_template has no default template")

    def token_text(key: str, given: str) -> str:
        value = data.get(key)
        if isinstance(value, dict):  # AddedToken form
            value = value.get("content")
        return given or (value if isinstance(value, str) else "")

    return JinjaTemplate(source, bos_token=token_text("bos_token", bos_token),
                         eos_token=token_text("eos_token", eos_token), name=path.stem)
