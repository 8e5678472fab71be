"""Jinja chat templates (GGUF ``tokenizer.chat_template``, Hugging Face ``chat_template``, user-supplied).

A template comes from a model file, that is, from a stranger, so it is rendered only in Jinja's
``ImmutableSandboxedEnvironment``, configured as Hugging Face transformers and llama.cpp do (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text). On top of the
sandbox:

- reaching for an unsafe attribute (anything starting with ``_``, function internals...) raises at once instead of
  yielding an undefined value, so injection payloads fail loudly with ``TemplateSecurityError``;
- string and list repetition and powers are bounded, so a template cannot exhaust memory.
"""
from __future__ import annotations

import json
import operator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .base import ChatTemplate, TemplateError, TemplateSecurityError, normalize_messages

# A chat prompt longer than this is a runaway template, not a conversation.
_MAX_REPEAT_LENGTH = 10_000_000
_MAX_POWER_EXPONENT = 4096

# Text markers that end an assistant turn in common templates; those present in a template become stop strings.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|EOT|>", "<|endoftext|>",
                       "<|end_of_text|>", "</s>")


def _raise_exception(message: str):
    raise TemplateError(f"chat template error: {message}")


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # As transformers' chat-template tojson: no HTML escaping (unlike Jinja's built-in), non-ASCII kept.
    try:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"chat template: tojson cannot serialize {type(value).__name__}: {exc}") from None


class ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict about unsafe access and bounded in repetition."""

    intercepted_binops = frozenset(["*", "**"])

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")

    def call_binop(self, context, operator_name: str, left: Any, right: Any):
        if operator_name == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(count, int):
                    if len(sequence) * max(count, 0) > _MAX_REPEAT_LENGTH:
                        raise SecurityError("chat template repeats a sequence beyond "
                                            f"{_MAX_REPEAT_LENGTH} items")
            return operator.mul(left, right)
        if operator_name == "**":
            if isinstance(right, int) and abs(right) > _MAX_POWER_EXPONENT:
                raise SecurityError(f"chat template raises to a power above {_MAX_POWER_EXPONENT}")
            return operator.pow(left, right)
        return super().call_binop(context, operator_name, left, right)


def _make_environment() -> ChatTemplateSandbox:
    env = ChatTemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENVIRONMENT = _make_environment()


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template, compiled once (syntax errors raise ``TemplateError`` here) and rendered sandboxed."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "jinja",
                 extra_stop_strings: tuple[str, ...] | list[str] = ()):
        if not isinstance(source, str):
            raise TemplateError(f"a Jinja chat template must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.name = name
        self.extra_stop_strings = tuple(extra_stop_strings)
        try:
            self._compiled = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {name!r} has a syntax error at line {exc.lineno}: {exc.message}") \
                from None
        except SecurityError as exc:
            raise TemplateSecurityError(f"chat template {name!r} is unsafe: {exc}") from None

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, name: str = "tokenizer.chat_template") -> "JinjaTemplate":
        """The template stored in GGUF metadata, with the BOS/EOS token texts looked up in the vocabulary."""
        source = metadata.get(name)
        if not isinstance(source, str) or not source:
            raise TemplateError(f"the model file has no {name} metadata")
        tokens = metadata.get("tokenizer.ggml.tokens")

        def token_text(key: str) -> str:
            token_id = metadata.get(key)
            if tokens is None or token_id is None:
                return ""
            token_id = int(token_id[0] if isinstance(token_id, (list, tuple)) else token_id)
            return str(tokens[token_id]) if 0 <= token_id < len(tokens) else ""

        return cls(source, bos_token=token_text("tokenizer.ggml.bos_token_id"),
                   eos_token=token_text("tokenizer.ggml.eos_token_id"), name=name)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               *, continue_final_message: bool = False, **extra_variables: Any) -> str:
        messages = normalize_messages(messages)
        if continue_final_message:
            if not messages:
                raise TemplateError("continue_final_message needs at least one message")
            if add_generation_prompt:
                add_generation_prompt = False  # the reply being continued is the last message itself
        variables = dict(extra_variables)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        try:
            prompt = self._compiled.render(**variables)
        except SecurityError as exc:
            raise TemplateSecurityError(f"chat template {self.name!r} tried an unsafe operation: {exc}") from None
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                OverflowError, RecursionError) as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}") from None
        if continue_final_message:
            prompt = _cut_after_final_message(prompt, messages[-1]["content"])
        return prompt

    @property
    def stop_strings(self) -> list[str]:
        found = [marker for marker in END_OF_TURN_MARKERS if marker in self.source]
        if self.eos_token and self.eos_token not in found:
            found.append(self.eos_token)
        found += [s for s in self.extra_stop_strings if s not in found]
        return found


def _cut_after_final_message(prompt: str, final_content: str) -> str:
    # As transformers' continue_final_message: the prompt stops right after the last message's (stripped) text.
    content = final_content.strip()
    if not content:
        raise TemplateError("continue_final_message needs a final message with text")
    position = prompt.rfind(content)
    if position < 0:
        raise TemplateError("continue_final_message: the final message's text is not in the rendered prompt")
    return prompt[:position + len(content)]
