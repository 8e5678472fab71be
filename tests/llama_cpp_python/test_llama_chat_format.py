# From llama-cpp-python, https://github.com/abetlen/llama-cpp-python, tests/test_llama_chat_format.py at commit
# 3691546f1c9e0c1bf93323dff02230bd959cf562 (tag v0.3.35, the newest release in the snapshot; the installed
# llama-cpp-python is 0.3.36). MIT License, Copyright (c) 2023 Andrei Betlen.
#
# Run against ggml_backend. Changed, each place marked "ggml_backend:": the imports (llama_cpp ->
# llama_cpp_shim, which maps them to ggml_backend.templates) and one expected string (it says why).
import json

import jinja2

# ggml_backend: the imports were from llama_cpp, llama_cpp.llama_types and llama_cpp.llama_chat_format; the shim
# maps them to ggml_backend.templates (the "mistral-instruct" built-in, JinjaTemplate) and plain dicts
from llama_cpp_shim import (
    ChatCompletionRequestUserMessage,
)
from llama_cpp_shim import llama_types
from llama_cpp_shim import llama_chat_format

hf_tokenizer_config_to_chat_formatter = llama_chat_format.hf_tokenizer_config_to_chat_formatter


def test_mistral_instruct():
    chat_template = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    chat_formatter = jinja2.Template(chat_template)
    messages = [
        llama_types.ChatCompletionRequestUserMessage(
            role="user", content="Instruction"
        ),
        llama_types.ChatCompletionRequestAssistantMessage(
            role="assistant", content="Model answer"
        ),
        llama_types.ChatCompletionRequestUserMessage(
            role="user", content="Follow-up instruction"
        ),
    ]
    response = llama_chat_format.format_mistral_instruct(
        messages=messages,
    )
    prompt = ("" if response.added_special else "<s>") + response.prompt
    reference = chat_formatter.render(
        messages=messages,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert prompt == reference


mistral_7b_tokenizer_config = """{
  "add_bos_token": true,
  "add_eos_token": false,
  "added_tokens_decoder": {
    "0": {
      "content": "<unk>",
      "lstrip": false,
      "normalized": false,
      "rstrip": false,
      "single_word": false,
      "special": true
    },
    "1": {
      "content": "<s>",
      "lstrip": false,
      "normalized": false,
      "rstrip": false,
      "single_word": false,
      "special": true
    },
    "2": {
      "content": "</s>",
      "lstrip": false,
      "normalized": false,
      "rstrip": false,
      "single_word": false,
      "special": true
    }
  },
  "additional_special_tokens": [],
  "bos_token": "<s>",
  "clean_up_tokenization_spaces": false,
  "eos_token": "</s>",
  "legacy": true,
  "model_max_length": 1000000000000000019884624838656,
  "pad_token": null,
  "sp_model_kwargs": {},
  "spaces_between_special_tokens": false,
  "tokenizer_class": "LlamaTokenizer",
  "unk_token": "<unk>",
  "use_default_system_prompt": false,
  "chat_template": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
}"""


def test_hf_tokenizer_config_str_to_chat_formatter():
    tokenizer_config = json.loads(mistral_7b_tokenizer_config)
    chat_formatter = hf_tokenizer_config_to_chat_formatter(tokenizer_config)
    chat_formatter_respoonse = chat_formatter(
        messages=[
            ChatCompletionRequestUserMessage(role="user", content="Hello, world!"),
        ]
    )

    # ggml_backend: expected string adapted (was "<s>[INST] Hello, world! [/INST]</s>"). llama-cpp-python asks
    # for the assistant's turn by appending an empty assistant message ("TODO: verify this is correct" there),
    # so this template closes that empty turn with "</s>"; ggml_backend renders the template with
    # add_generation_prompt=True, as transformers' apply_chat_template does, and this template adds nothing for
    # it. The point of the test, a Hugging Face tokenizer_config's chat_template rendered with its bos_token, holds.
    assert chat_formatter_respoonse.prompt == ("<s>[INST] Hello, world! [/INST]")
