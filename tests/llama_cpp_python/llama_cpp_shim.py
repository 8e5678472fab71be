"""What llama-cpp-python's own tests import as ``llama_cpp``, mapped to ggml_backend (the copied tests do
``import llama_cpp_shim as llama_cpp`` and nothing else changes in their bodies).

Only names that exist in ggml_backend are mapped: the ``Llama`` API and its helpers come straight from
``ggml_backend`` (``llama_speculative`` is ``ggml_backend.speculative``); ``llama_chat_format``'s two functions the tests call are thin wrappers over
``ggml_backend.templates`` (the ``mistral-instruct`` built-in and ``JinjaTemplate``), returning llama-cpp-python's
``ChatFormatterResponse`` shape; ``llama_types``' message TypedDicts are plain dicts, which is what they are at run
time in llama-cpp-python too. llama.cpp's C API (``llama_cpp.llama_cpp``, ``_internals``, ``llama_*`` functions)
has no counterpart here; the tests that use it are skipped with a reason.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

from ggml_backend import (LLAMA_DEFAULT_SEED, Llama, LlamaCache, LlamaDiskCache, LlamaGrammar, LlamaRAMCache,  # noqa: F401
                          LlamaState, LlamaTokenizer, LogitsProcessorList, MinTokensLogitsProcessor,
                          StoppingCriteriaList, __version__)
from ggml_backend import speculative as llama_speculative  # noqa: F401 (llama_cpp.llama_speculative)
from ggml_backend.templates import JinjaTemplate, get_template

#: llama.cpp's C objects (``llama_cpp._internals``): none in ggml_backend
_internals = None


# --- llama_cpp.llama_types: TypedDicts, i.e. dicts at run time ---------------------------------------------------
def ChatCompletionRequestUserMessage(**fields) -> dict:  # noqa: N802 (llama-cpp-python's name)
    return dict(fields)


def ChatCompletionRequestAssistantMessage(**fields) -> dict:  # noqa: N802
    return dict(fields)


def ChatCompletionRequestSystemMessage(**fields) -> dict:  # noqa: N802
    return dict(fields)


llama_types = types.SimpleNamespace(
    ChatCompletionRequestUserMessage=ChatCompletionRequestUserMessage,
    ChatCompletionRequestAssistantMessage=ChatCompletionRequestAssistantMessage,
    ChatCompletionRequestSystemMessage=ChatCompletionRequestSystemMessage,
)


# --- llama_cpp.llama_chat_format -----------------------------------------------------------------------------------
@dataclass
class ChatFormatterResponse:
    """llama-cpp-python's formatter result: the prompt, its stop strings, and whether the prompt already holds the
    special tokens (BOS) that tokenizing would otherwise add."""
    prompt: str
    stop: Optional[list] = None
    added_special: bool = False
    stopping_criteria: Optional[object] = field(default=None)


def format_mistral_instruct(messages, **kwargs) -> ChatFormatterResponse:
    """``chat_format="mistral-instruct"``: ggml_backend's built-in of that name (llama-cpp-python's format)."""
    template = get_template("mistral-instruct")
    return ChatFormatterResponse(prompt=template.render(list(messages)), stop=template.stop_strings)


def hf_tokenizer_config_to_chat_formatter(tokenizer_config: dict, add_generation_prompt: bool = True):
    """A formatter from a Hugging Face ``tokenizer_config.json`` dict: its ``chat_template`` rendered by
    ggml_backend's sandboxed ``JinjaTemplate`` with the config's ``bos_token``/``eos_token``."""
    template = JinjaTemplate(tokenizer_config["chat_template"], bos_token=tokenizer_config["bos_token"],
                             eos_token=tokenizer_config["eos_token"])

    def format_tokenizer_config(messages, **kwargs) -> ChatFormatterResponse:
        prompt = template.render(list(messages), add_generation_prompt=add_generation_prompt)
        return ChatFormatterResponse(prompt=prompt, stop=template.stop_strings, added_special=True)

    return format_tokenizer_config


llama_chat_format = types.SimpleNamespace(
    ChatFormatterResponse=ChatFormatterResponse,
    format_mistral_instruct=format_mistral_instruct,
    hf_tokenizer_config_to_chat_formatter=hf_tokenizer_config_to_chat_formatter,
)
