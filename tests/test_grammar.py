"""Structured output (generation/grammar.py): llguidance masks every sampled token, so what the model writes
parses, on the real model at temperature 0.8 over several seeds."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="llguidance, the grammar engine, is a dependency of the package: reinstall it")

from ggml_backend import Llama  # noqa: E402
from ggml_backend.generation import Sampler, SamplingParams  # noqa: E402
from ggml_backend.generation.grammar import GrammarError, LlamaGrammar, grammar_from_response_format  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
    "address": {"type": "object", "properties": {"country": {"enum": ["NO", "IT", "JP"]},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{4}$"}},
                "required": ["country", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False}


@pytest.fixture(scope="module")
def qwen():
    return Llama(n_ctx=512, verbose=False)


def constrained(llm, prompt: str, grammar: LlamaGrammar, seed: int, max_tokens: int = 80) -> str:
    """A sampling loop under the grammar (temperature 0.8): the engine's eval, the sampler, the matcher."""
    matcher = grammar.matcher(llm.tokenizer)
    sampler = Sampler(SamplingParams(temperature=0.8, seed=seed), n_vocab=llm.n_vocab(), seed=seed)
    llm.reset()
    llm.eval(llm.tokenize(prompt, special=True))
    out = []
    for _ in range(max_tokens):
        token = sampler.sample(matcher.mask(np.asarray(llm.eval_logits[-1])), out[-64:])
        if token in llm.tokenizer.eog_ids:
            break
        matcher.accept(token)
        out.append(token)
        if matcher.done():
            break
        matcher.prepare()   # the next mask is computed while the forward pass runs
        llm.eval([token])
    return llm.detokenize(out).decode()


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_always_validates(qwen, seed):
    text = constrained(qwen, chat_prompt("Describe a made-up user as JSON."), LlamaGrammar.from_json_schema(PERSON),
                       seed, max_tokens=160)
    data = json.loads(text)
    assert set(data) == {"name", "age", "role", "tags", "address"}
    assert data["address"]["country"] in ("NO", "IT", "JP") and re.fullmatch(r"[0-9]{4}", data["address"]["zip"])
    assert isinstance(data["name"], str) and len(data["name"]) <= 20
    assert isinstance(data["age"], int) and 0 <= data["age"] <= 120
    assert data["role"] in ("admin", "user", "guest")
    assert 1 <= len(data["tags"]) <= 3 and all(isinstance(t, str) and len(t) <= 10 for t in data["tags"])


@pytest.mark.parametrize("seed", [1, 2])
def test_gbnf_alternatives_and_number_lists(qwen, seed):
    answer = constrained(qwen, chat_prompt("Is water wet?"),
                         LlamaGrammar.from_string('root ::= "yes" | "no" | "maybe"'), seed)
    assert answer in ("yes", "no", "maybe")
    numbers = constrained(qwen, chat_prompt("List some primes."), LlamaGrammar.from_string(
        'root ::= "[" num ("," " "? num){2,4} "]"\nnum ::= [1-9] [0-9]{0,2}'), seed)
    values = json.loads(numbers)
    assert 3 <= len(values) <= 5 and all(1 <= v <= 999 for v in values)


def test_any_json_object_and_response_formats(qwen):
    text = constrained(qwen, chat_prompt("Give me a JSON object about cats."), LlamaGrammar.any_json_object(), 7, 120)
    assert isinstance(json.loads(text), dict)
    assert grammar_from_response_format(None) is None
    assert grammar_from_response_format({"type": "text"}) is None
    assert grammar_from_response_format({"type": "json_object"}).source == "JSON schema"
    assert grammar_from_response_format({"type": "json_object", "schema": PERSON}).source == "JSON schema"
    assert grammar_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})


def test_the_mask_allows_only_what_continues_the_grammar(qwen):
    matcher = LlamaGrammar.from_string('root ::= "yes" | "no"').matcher(qwen.tokenizer)
    allowed = matcher.allowed()
    texts = {qwen.detokenize([t]).decode() for t in np.flatnonzero(allowed)}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    with pytest.raises(GrammarError, match="outside"):
        matcher.accept(qwen.tokenize("maybe", add_bos=False)[0])


@pytest.mark.parametrize("make, needle", [
    (lambda: LlamaGrammar.from_string("root ::= undefined_rule"), "undefined_rule"),
    (lambda: LlamaGrammar.from_string(""), "empty"),
    (lambda: LlamaGrammar.from_string(42), "must be a string"),
    (lambda: LlamaGrammar.from_json_schema("{not json"), "not valid JSON"),
    (lambda: LlamaGrammar.from_json_schema("[1, 2]"), "must be an object"),
    (lambda: LlamaGrammar.from_json_schema({"type": "string", "pattern": "(?<=a)b"}), "JSON schema"),
    (lambda: LlamaGrammar.from_string("root ::= " + "\"a\" " * 200_000), "limit"),
    (lambda: LlamaGrammar.from_file("/nonexistent/grammar.gbnf"), "cannot read"),
    (lambda: grammar_from_response_format({"type": "xml"}), "not one of"),
    (lambda: grammar_from_response_format({"type": "json_schema"}), "json_schema"),
])
def test_grammars_that_cannot_be_used_say_why(make, needle):
    with pytest.raises(GrammarError, match=needle):
        make()


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}


def test_a_lazy_tool_grammar_is_free_until_the_call_opens(qwen):
    from ggml_backend.generation.grammar import tool_call_grammar
    grammar = tool_call_grammar([WEATHER], qwen.tokenizer)
    opening, closing = (qwen.tokenize(tag, add_bos=False, special=True)[0] for tag in ("<tool_call>", "</tool_call>"))
    assert grammar.trigger_token == opening
    matcher = grammar.matcher(qwen.tokenizer)
    logits = np.zeros(qwen.n_vocab(), np.float32)
    for token in qwen.tokenize("Let me check.", add_bos=False):   # free text: nothing masked
        assert matcher.mask(logits) is logits
        matcher.accept(token)
    matcher.accept(opening)                                       # the call opens: now held to the tools
    allowed = np.isfinite(matcher.mask(logits))
    assert not allowed[qwen.tokenize("Sure", add_bos=False)[0]]
    call = qwen.tokenize('\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n', add_bos=False) + [closing]
    for token in call:
        assert np.isfinite(matcher.mask(logits)[token])
        matcher.accept(token)
    assert matcher.mask(logits) is logits and not matcher.done()   # free again after the call


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_calls_the_model_chooses_to_make_always_validate(qwen, seed):
    """tool_choice "auto" at temperature 1: the model may answer or call; every call it starts parses, names a
    tool and has valid arguments."""
    llm = qwen
    out = llm.create_chat_completion([{"role": "user", "content": "What's the weather like in Oslo and Rome?"}],
                                     tools=[WEATHER], temperature=1.0, seed=seed, max_tokens=80)
    message = out["choices"][0]["message"]
    for call in message.get("tool_calls") or []:
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "get_weather" and set(args) == {"city"} and len(args["city"]) <= 40
    assert "<tool_call>" not in (message["content"] or "")   # no half call left as text
