"""``chat_format="chatml-function-calling"`` (ggml_backend/function_calling.py): llama-cpp-python's tool protocol.
Each step is held to a grammar, so whatever the (small) model chooses, the reply is a message or calls that name a
tool and whose arguments validate."""
from __future__ import annotations

import json

import pytest

from ggml_backend import Llama
from ggml_backend.function_calling import MAX_CALLS, render_prompt

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def llm():
    return Llama(n_ctx=1024, chat_format="chatml-function-calling", verbose=False)


def ask(text):
    return [{"role": "user", "content": text}]


def assert_valid_call(call):
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 30
    else:
        assert call["function"]["name"] == "get_time" and args == {}


def test_a_named_tool_makes_one_valid_call(llm):
    for seed in (1, 2):
        out = llm.create_chat_completion(ask("What's the weather in Oslo?"), tools=[WEATHER, CLOCK], seed=seed,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         temperature=0.8, max_tokens=40)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert_valid_call(call)
        assert choice["message"]["function_call"] == call["function"]   # the legacy field, for one call


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_auto_and_required_give_a_message_or_valid_calls(llm, tool_choice):
    out = llm.create_chat_completion(ask("What time is it, and the weather in Rome?"), tools=[WEATHER, CLOCK],
                                     tool_choice=tool_choice, temperature=0.8, seed=3, max_tokens=40)
    message = out["choices"][0]["message"]
    if message.get("tool_calls"):
        assert 1 <= len(message["tool_calls"]) <= MAX_CALLS
        for call in message["tool_calls"]:
            assert_valid_call(call)
        assert out["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert tool_choice == "auto" and isinstance(message["content"], str)
    assert out["usage"]["completion_tokens"] > 0


def test_streamed_and_without_tools(llm):
    chunks = list(llm.create_chat_completion(ask("Weather in Paris?"), tools=[WEATHER], stream=True,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                             temperature=0, max_tokens=40))
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert len(calls) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert_valid_call(calls[0])
    plain = llm.create_chat_completion(ask("Say hi."), temperature=0, max_tokens=8)
    assert plain["choices"][0]["message"]["content"] and "tool_calls" not in plain["choices"][0]["message"]
    with pytest.raises(NotImplementedError, match="chatml-function-calling"):
        llm.create_chat_completion(ask("hi"), response_format={"type": "json_object"})


def test_the_prompt_lists_the_tools_and_earlier_calls():
    prompt = render_prompt([{"role": "system", "content": "Be brief."}, *ask("Weather in Oslo?"),
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "c1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}], [WEATHER])
    assert prompt.startswith("<|im_start|>system\nBe brief.\nYou have access to the following functions:")
    assert "functions.get_weather:\n// Current weather in a city" in prompt
    assert '<|im_start|>assistant\nfunctions.get_weather:\n{"city": "Oslo"}<|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n")
