"""Chat templates: text-generation-webui's instruction templates, the built-ins, sandboxed Jinja, tool calls.

Expected prompts for Alpaca / Vicuna / Llama-v2 / ChatML are what text-generation-webui's chat.py (late 2023)
produced from its instruction-templates/*.yaml of that time (checked against that code during development).
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from ggml_backend.templates import (
    ChatTemplate, JinjaTemplate, TemplateError, TemplateLimitError, TemplateSecurityError,
    TextgenTemplate, get_template, list_templates, parse_tool_calls,
)

GPT4ALL_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                  "the request.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

# The files as text-generation-webui shipped them (instruction-templates/, late 2023), byte for byte.
ALPACA_YAML = '''user: "### Instruction:"
bot: "### Response:"
turn_template: "<|user|>\\n<|user-message|>\\n\\n<|bot|>\\n<|bot-message|>\\n\\n"
context: "<|system-message|>\\n\\n"
system_message: "Below is an instruction that describes a task. Write a response that appropriately completes the request."
'''
VICUNA_YAML = '''user: "USER:"
bot: "ASSISTANT:"
turn_template: "<|user|> <|user-message|>\\n<|bot|> <|bot-message|></s>\\n"
context: "<|system-message|>\\n\\n"
system_message: "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
'''
LLAMA_V2_YAML = '''user: ""
bot: ""
turn_template: "<|user|><|user-message|> [/INST] <|bot|><|bot-message|> </s><s>[INST] "
context: "[INST] <<SYS>>\\n<|system-message|>\\n<</SYS>>\\n\\n"
system_message: "Answer the questions."
'''
# A plain YAML scalar: here "\n" is a backslash and an n, which the turn template reads as a newline.
CHATML_YAML = '''user: user
bot: assistant
turn_template: <|im_start|><|user|>\\n<|user-message|><|im_end|>\\n<|im_start|><|bot|>\\n<|bot-message|><|im_end|>\\n
context: |
  <|im_start|>system
  <|system-message|><|im_end|>
'''

ONE_QUESTION = [{"role": "user", "content": "How are you?"}]
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! "},
    {"role": "user", "content": " How are you?"},
]


# ---- text-generation-webui's instruction templates --------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, builtin", [(ALPACA_YAML, "alpaca"), (VICUNA_YAML, "vicuna"),
                                                (LLAMA_V2_YAML, "llama-2")])
def test_textgen_files_load_as_the_builtins(yaml_text, builtin):
    loaded = TextgenTemplate.from_yaml(yaml_text)
    assert loaded == get_template(builtin)
    assert loaded.render(CONVERSATION) == get_template(builtin).render(CONVERSATION)


def test_alpaca_prompt():
    alpaca = TextgenTemplate.from_yaml(ALPACA_YAML)
    assert alpaca.render(ONE_QUESTION) == (
        GPT4ALL_SYSTEM + "\n\n### Instruction:\nHow are you?\n\n### Response:\n")
    assert alpaca.render(CONVERSATION) == (
        GPT4ALL_SYSTEM + "\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n"
        "### Instruction:\nHow are you?\n\n### Response:\n")


def test_vicuna_prompt():
    vicuna = TextgenTemplate.from_yaml(VICUNA_YAML)
    assert vicuna.render(ONE_QUESTION) == VICUNA_SYSTEM + "\n\nUSER: How are you?\nASSISTANT:"
    assert vicuna.render(CONVERSATION) == (
        VICUNA_SYSTEM + "\n\nUSER: Hi\nASSISTANT: Hello!</s>\nUSER: How are you?\nASSISTANT:")


def test_llama_v2_prompt_and_system_message():
    llama = TextgenTemplate.from_yaml(LLAMA_V2_YAML)
    assert llama.render(ONE_QUESTION) == (
        "[INST] <<SYS>>\nAnswer the questions.\n<</SYS>>\n\nHow are you? [/INST] ")
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    assert llama.render(messages) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] How are you? [/INST] ")
    # A blank system message keeps the template's own, as chat.py's custom_system_message did.
    blank = [{"role": "system", "content": "  "}] + ONE_QUESTION
    assert llama.render(blank) == llama.render(ONE_QUESTION)


def test_chatml_yaml_with_literal_backslash_n():
    chatml = TextgenTemplate.from_yaml(CHATML_YAML)
    assert chatml.render([{"role": "system", "content": "S"}] + CONVERSATION) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
    assert chatml == get_template("textgen-chatml")


def test_textgen_stopping_strings():
    assert get_template("alpaca").stopping_strings() == ["\n\n### Response:", "\n\n### Instruction:"]
    assert get_template("vicuna").stopping_strings() == ["\nASSISTANT:", "</s>\nUSER:"]
    assert get_template("llama-2").stopping_strings() == [" [/INST]", " </s><s>[INST]"]
    assert get_template("vicuna").stop_strings == ["\nASSISTANT:", "</s>\nUSER:", "</s>", "\nUSER:"]
    assert "\n### Instruction:" in get_template("alpaca").stop_strings
    assert "</s>" in get_template("alpaca").stop_strings
    assert "<|im_end|>" in get_template("oobabooga-chatml").stop_strings


def test_continue_and_impersonate():
    vicuna = get_template("vicuna")
    history = CONVERSATION[:2]
    assert vicuna.render(history, continue_final_message=True) == (
        VICUNA_SYSTEM + "\n\nUSER: Hi\nASSISTANT: Hello!")
    assert vicuna.render(history, impersonate=True) == VICUNA_SYSTEM + "\n\nUSER: Hi\nASSISTANT: Hello!</s>\nUSER:"
    # The user's partial text follows the prompt, as the UI's impersonate did.
    assert vicuna.render(history + [{"role": "user", "content": "Tell"}], impersonate=True).endswith(
        "</s>\nUSER:Tell")
    alpaca = get_template("alpaca")
    assert alpaca.render(history, continue_final_message=True).endswith("### Response:\nHello!")
    assert alpaca.render(history, impersonate=True).endswith("### Response:\nHello!\n\n### Instruction:\n")
    with pytest.raises(TemplateError):
        alpaca.render(ONE_QUESTION, continue_final_message=True)


def test_truncation_drops_oldest_rows_never_context():
    alpaca = get_template("alpaca")
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    full = alpaca.render(messages)

    def count_words(text: str) -> int:
        return len(text.split())

    assert count_words(full) == 70
    cut = alpaca.render(messages, max_prompt_tokens=40, count_tokens=count_words)
    assert count_words(cut) < 40
    assert cut == (GPT4ALL_SYSTEM + "\n\n### Instruction:\nquestion 4\n\n### Response:\nanswer 4\n\n"
                   "### Instruction:\nquestion 5\n\n### Response:\nanswer 5\n\n"
                   "### Instruction:\nlast question\n\n### Response:\n")
    # Past all history the context and the newest turn stay, even over budget (as chat.py).
    tiny = alpaca.render(messages, max_prompt_tokens=5, count_tokens=count_words)
    assert tiny == GPT4ALL_SYSTEM + "\n\n### Instruction:\nlast question\n\n### Response:\n"
    # Rows are dropped one at a time: an odd budget can leave a reply without its question.
    odd = alpaca.render(messages, max_prompt_tokens=28, count_tokens=count_words)
    assert odd == (GPT4ALL_SYSTEM + "\n\n### Response:\nanswer 5\n\n"
                   "### Instruction:\nlast question\n\n### Response:\n")
    with pytest.raises(TemplateError):
        alpaca.render(messages, max_prompt_tokens=10)


def test_yaml_round_trip(tmp_path):
    alpaca = TextgenTemplate.from_yaml(ALPACA_YAML, name="Alpaca")
    assert alpaca.to_yaml() == (
        "user: '### Instruction:'\n"
        "bot: '### Response:'\n"
        "turn_template: <|user|>\\n<|user-message|>\\n\\n<|bot|>\\n<|bot-message|>\\n\\n\n"
        "context: |+\n  <|system-message|>\n\n"
        "system_message: " + GPT4ALL_SYSTEM + "\n")
    for name in ("alpaca", "vicuna", "llama-2", "textgen-chatml", "oobabooga-chatml"):
        template = get_template(name)
        path = tmp_path / f"{name}.yaml"
        template.save(path)
        again = TextgenTemplate.load(path)
        assert again.fields() == template.fields()
        assert again.to_yaml() == template.to_yaml()
        assert again.render(CONVERSATION) == template.render(CONVERSATION)
        assert get_template(str(path)).render(CONVERSATION) == template.render(CONVERSATION)
    built = TextgenTemplate(user="Q:", bot="A:", turn_template="<|user|> <|user-message|>\n<|bot|> <|bot-message|>\n",
                            context="<|system-message|>\n", system_message="Sys")
    assert built.turn_template == r"<|user|> <|user-message|>\n<|bot|> <|bot-message|>\n"
    assert TextgenTemplate.from_yaml(built.to_yaml()) == built
    assert built.render(ONE_QUESTION) == "Sys\nQ: How are you?\nA:"


def test_bad_textgen_templates():
    with pytest.raises(TemplateError, match="lacks"):
        TextgenTemplate(user="U", bot="B", turn_template="<|user|> <|user-message|>")
    with pytest.raises(TemplateError):
        TextgenTemplate.from_yaml("user: [1, 2]\nturn_template: x")
    with pytest.raises(TemplateError):
        TextgenTemplate.from_yaml("- just a list")
    with pytest.raises(TemplateError):
        get_template("alpaca").render(ONE_QUESTION, tools=[{"type": "function", "function": {"name": "f"}}])


# ---- built-in ChatML family and the registry ---------------------------------------------------------------------

def test_chatml_gpt4all_and_oobabooga_builtins():
    chatml, gpt4all, ooba = get_template("chatml"), get_template("gpt4all"), get_template("oobabooga-chatml")
    assert chatml.render(ONE_QUESTION) == "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    expected = (f"<|im_start|>system\n{GPT4ALL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"
                "<|im_start|>assistant\n")
    trimmed = [dict(m, content=m["content"].strip()) for m in CONVERSATION]
    assert gpt4all.render(trimmed) == expected
    assert ooba.render(CONVERSATION) == expected
    with_system = [{"role": "system", "content": "Be nice."}] + trimmed
    assert gpt4all.render(with_system) == ooba.render(with_system) == expected.replace(GPT4ALL_SYSTEM, "Be nice.")
    assert chatml.render(trimmed, add_generation_prompt=False) == expected[len(
        f"<|im_start|>system\n{GPT4ALL_SYSTEM}<|im_end|>\n"):-len("<|im_start|>assistant\n")]
    assert chatml.render(trimmed[:2], continue_final_message=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!")
    assert chatml.stop_strings == ["<|im_end|>"]


def test_raw_registry_and_errors():
    assert get_template("raw").render(CONVERSATION) == "HiHello!  How are you?"
    assert set(list_templates()) >= {"chatml", "gpt4all", "oobabooga-chatml", "llama-2", "alpaca", "vicuna", "raw"}
    assert all(isinstance(get_template(name), ChatTemplate) for name in list_templates())
    assert get_template("Vicuna-v1.1").name == "vicuna" and get_template("Llama-v2").name == "llama-2"
    with pytest.raises(TemplateError, match="unknown chat template"):
        get_template("no-such-template")
    with pytest.raises(TemplateError):
        get_template("chatml").render([{"role": "wizard", "content": "x"}])
    with pytest.raises(TemplateError):
        get_template("chatml").render([{"role": "user", "content": 5}])
    assert issubclass(TemplateError, ValueError)


def test_get_template_from_files(tmp_path):
    jinja_file = tmp_path / "mine.jinja"
    jinja_file.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert get_template(str(jinja_file)).render(ONE_QUESTION) == "[user] How are you?\n"
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                                  "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert get_template(config).render(ONE_QUESTION) == "<s>How are you?</s>"
    inline = get_template("{{ messages | length }}")
    assert isinstance(inline, JinjaTemplate) and inline.render(CONVERSATION) == "3"


# ---- sandboxed Jinja ------------------------------------------------------------------------------------------------

PAYLOADS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ '{0.__class__.__base__}'.format(1) }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{{ 'a' * 100000000 }}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_injection_payloads_fail_loudly(payload):
    template = JinjaTemplate(payload)
    with pytest.raises(TemplateSecurityError):
        template.render(ONE_QUESTION)


def test_payload_that_would_create_a_file_creates_nothing(tmp_path):
    target = tmp_path / "pwned"
    command = f"touch {target}"
    for payload in (
        "{{ cycler.__init__.__globals__.os.popen('" + command + "').read() }}",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('" + command + "') }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        "{{ c('" + command + "', shell=True) }}{% endif %}{% endfor %}",
        "{{ lipsum.__globals__['os'].popen('" + command + "').read() }}",
    ):
        with pytest.raises(TemplateSecurityError):
            JinjaTemplate(payload).render(ONE_QUESTION)
    assert not target.exists()


def test_jinja_load_errors_and_helpers():
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        JinjaTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        JinjaTemplate("{{ raise_exception('roles must alternate') }}").render(ONE_QUESTION)
    assert JinjaTemplate("{{ strftime_now('%Y') | length }}").render([]) == "4"
    assert JinjaTemplate("{{ {'k': 'é<'} | tojson }}").render([]) == '{"k": "é<"}'
    trimmed = JinjaTemplate("{% if true %}\n  A\n{% endif %}\nB").render([])
    assert trimmed == "  A\nB"   # trim_blocks + lstrip_blocks, as transformers and llama.cpp


# ---- time and size limits ------------------------------------------------------------------------------------------

# Each of these allocated a gigabyte or more, or never returned, before the limits; (template, limit named).
RUNAWAY_TEMPLATES = [
    ("{{ '%0999999999d' % 1 }}", "format width"),
    ("{{ '%*d' % (999999999, 1) }}", "format width"),
    ("{{ '{:>999999999}'.format(1) }}", "format width"),
    ("{{ '{:>{w}}'.format(1, w=999999999) }}", "format width"),
    ("{{ '%0999999d' | format(1) }}", "format width"),
    ("{{ 'a' * 10**9 }}", "string size"),
    ("{{ 'a'.encode() * 10**9 }}", "string size"),
    ("{{ 'a'.encode().ljust(999999999) }}", "format width"),
    ("{{ (1).to_bytes(999999999, 'big') }}", "string size"),
    ("{{ [1] * 10**8 }}", "sequence length"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "string size"),
    ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "string size"),
    ("{{ 2 ** 100000000 }}", "integer size"),
    ("{% set n = 2 ** 60000 %}{{ n * n }}", "integer size"),
    ("{{ range(10**9) | length }}", "range"),
    ("{{ 'x' | center(999999999) }}", "format width"),
    ("{{ 'x'.ljust(999999999) }}", "format width"),
    ("{{ 'x'.rjust(999999999) }}", "format width"),
    ("{{ 'x'.zfill(999999999) }}", "format width"),
    ("{{ 'a\tb'.expandtabs(999999999) }}", "format width"),
    ("{{ 'x' | indent(999999999, true) }}", "format width"),
    ("{{ 'x x' | wordwrap(999999999) }}", "format width"),
    ("{{ lipsum(1000000) }}", "lipsum"),
    ("{{ {'a': 1} | tojson(indent=999999999) }}", "format width"),
    ("{{ ('x' * 1000000).replace('x', 'yyyyyy') }}", "string size"),
    ("{{ ''.join(['x' * 1000000] * 100) }}", "string size"),
    ("{{ (['x' * 1000000] * 100) | join }}", "string size"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output size"),
    ("{% set s %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}{{ s | length }}",
     "output size"),
    ("{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endmacro %}{{ m() | length }}",
     "output size"),
    # the same list a hundred times, printed: small in memory, gigabytes as text
    ("{% set l = range(100000) | list %}{% set m = [l, l, l, l, l, l, l, l, l, l] %}{{ [m, m, m, m, m, m, m] }}",
     "string size"),
    ("{% set l = range(100000) | list %}{% set m = [l, l, l, l, l, l, l, l, l, l] %}{{ [m, m, m] | tojson }}",
     "string size"),
    ("{% set l = range(100000) | list %}{% set m = [l, l, l, l, l, l, l, l, l, l] %}{{ [m, m] | string }}",
     "string size"),
]


@pytest.mark.parametrize("source, limit", RUNAWAY_TEMPLATES)
def test_runaway_templates_stop_at_a_named_limit(source, limit):
    with pytest.raises(TemplateLimitError) as info:
        JinjaTemplate(source, name="hostile").render(ONE_QUESTION)
    assert info.value.limit == limit
    assert str(info.value).startswith("chat template 'hostile': ") and "limit" in str(info.value)
    assert isinstance(info.value, TemplateSecurityError)    # a resource attack is hostile input too


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # loops over plain lists, with empty bodies: no call or attribute access that a hook would see
    "{% set l = range(100000) | list %}{% for i in l %}{% for j in l %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",
])
def test_endless_loops_stop_at_the_time_limit(source):
    template = JinjaTemplate(source)
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match="render time limit of 1.5 s") as info:
        template.render(ONE_QUESTION)
    assert time.monotonic() - started < 3.0
    assert info.value.limit == "time"


def test_limits_per_template_and_the_rest_of_the_render_unchanged():
    chatty = JinjaTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", max_output_chars=10)
    assert chatty.render([{"role": "user", "content": "0123456789"}]) == "0123456789"
    with pytest.raises(TemplateLimitError, match="output size limit of 10 characters"):
        chatty.render([{"role": "user", "content": "0123456789"}] * 2)
    slow = JinjaTemplate("{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}",
                         time_limit_s=0.2)
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match="0.2 s"):
        slow.render([])
    assert time.monotonic() - started < 1.5
    with pytest.raises(ValueError, match="time_limit_s"):
        JinjaTemplate("x", time_limit_s=float("nan"))
    # what stays allowed: modest repeats, widths, ranges, powers, formats, loop output, lipsum
    ok = JinjaTemplate("{{ '-' * 80 }}|{{ '%05d' % 42 }}|{{ '{:>6}'.format('ab') }}|{{ 'x' | center(9) }}|"
                       "{{ range(1000) | sum }}|{{ 2 ** 64 }}|{{ [0] * 3 }}|{{ lipsum(2, html=false) | length > 0 }}|"
                       "{% for i in range(3) %}{{ i }}{% endfor %}|{{ ['a', 'b'] | join(',') }}|{{ {'k': [1]} | tojson }}")
    assert ok.render([]) == ("-" * 80 + "|00042|    ab|    x    |499500|18446744073709551616|[0, 0, 0]|True|012|a,b|"
                             '{"k": [1]}')


# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json), as llama.cpp and transformers render it.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def test_gemma3_template_renders_within_the_limits():
    gemma = JinjaTemplate(GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>")
    messages = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    assert gemma.render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(TemplateError, match="roles must alternate"):
        gemma.render(CONVERSATION[:1] * 2)
    # a long conversation: the limits cost little
    long_chat = [{"role": r, "content": "word " * 1000} for _ in range(200) for r in ("user", "assistant")]
    started = time.monotonic()
    assert len(gemma.render(long_chat)) > 1_900_000
    assert time.monotonic() - started < 1.0


# ---- the real Qwen2.5 template from the model file -----------------------------------------------------------------

def _gguf_metadata(path: Path, wanted: set[str]) -> dict:
    """Just the wanted metadata values of a GGUF file (a small reader so the test stays fast)."""
    scalar_formats = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                      12: "<d"}
    found = {}
    with open(path, "rb") as f:
        data = f.read(64 * 1024 * 1024)  # metadata of the default model sits well inside this
    assert data[:4] == b"GGUF"
    _version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    offset = 24

    def read_value(kind: int, offset: int, keep: bool):
        if kind == 8:
            (length,) = struct.unpack_from("<Q", data, offset)
            text = data[offset + 8:offset + 8 + length].decode("utf-8") if keep else None
            return text, offset + 8 + length
        if kind == 9:
            element_kind, count = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if element_kind != 8 and not keep:
                return None, offset + count * struct.calcsize(scalar_formats[element_kind])
            values = []
            for _ in range(count):
                value, offset = read_value(element_kind, offset, keep)
                values.append(value)
            return values, offset
        fmt = scalar_formats[kind]
        return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)

    for _ in range(n_kv):
        (length,) = struct.unpack_from("<Q", data, offset)
        key = data[offset + 8:offset + 8 + length].decode("utf-8")
        (kind,) = struct.unpack_from("<I", data, offset + 8 + length)
        value, offset = read_value(kind, offset + 12 + length, key in wanted)
        if key in wanted:
            found[key] = value
    return found


@pytest.fixture(scope="module")
def qwen_template() -> JinjaTemplate:
    from ggml_backend.default_model import default_model_path
    try:
        path = default_model_path(progress=False)
    except FileNotFoundError as exc:
        pytest.skip(reason=f"default model not installed: {exc}")
    metadata = _gguf_metadata(path, {"tokenizer.chat_template", "tokenizer.ggml.tokens",
                                     "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"})
    return JinjaTemplate.from_gguf_metadata(metadata)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_qwen_template_renders_chatml(qwen_template):
    assert qwen_template.eos_token == "<|im_end|>" and qwen_template.bos_token == "<|endoftext|>"
    assert "<|im_end|>" in qwen_template.stop_strings
    messages = [{"role": "system", "content": "You are a helpful coding assistant."},
                {"role": "user", "content": "Write hello world."},
                {"role": "assistant", "content": "print('hello world')"},
                {"role": "user", "content": "In C?"}]
    expected = ("<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n"
                "<|im_start|>user\nWrite hello world.<|im_end|>\n"
                "<|im_start|>assistant\nprint('hello world')<|im_end|>\n"
                "<|im_start|>user\nIn C?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen_template.render(messages) == expected
    assert get_template("chatml").render(messages) == expected
    # Without a system message Qwen's template brings its own.
    assert qwen_template.render(ONE_QUESTION) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen_template.render(messages[:3], continue_final_message=True) == expected[:expected.index(
        "<|im_end|>\n<|im_start|>user\nIn C?")]
    # within the time and size limits, with room to spare, for a conversation of 400 long turns
    long_chat = [{"role": r, "content": "word " * 1000} for _ in range(200) for r in ("user", "assistant")]
    started = time.monotonic()
    assert len(qwen_template.render(long_chat)) > 1_900_000
    assert time.monotonic() - started < 1.0


def test_qwen_template_with_tools(qwen_template):
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": '{"temp": 21}'}]
    prompt = qwen_template.render(messages, tools=[WEATHER_TOOL])
    assert prompt == (
        "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER_TOOL) +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert get_template("chatml").render(messages, tools=[WEATHER_TOOL]) == prompt
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # caller's data untouched


# ---- tool-call parsing ----------------------------------------------------------------------------------------------

def test_parse_tool_calls():
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>')
    content, calls = parse_tool_calls(reply)
    assert content == "Let me check."
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                     {"name": "get_time", "arguments": {"tz": "CET"}}]
    assert parse_tool_calls("plain answer") == ("plain answer", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])
