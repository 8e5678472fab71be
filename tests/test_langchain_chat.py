"""ChatGGML beyond the standard tests: message conversion, the tool-call stream parser, tool_choice, structured
output and a prompt rendered through the model's own template. Model calls are short (a few tokens)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_core", reason="langchain-core is a dev dependency (pip install -e '.[dev]')")

try:
    import langchain_ggml  # noqa: F401
except ImportError:   # not installed as a package yet: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "langchain"))

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from langchain_ggml import ChatGGML, convert_messages  # noqa: E402
from ggml_backend.generation.grammar import forced_call_grammar  # noqa: E402
from ggml_backend.templates.tool_calls import (ToolCallSplitter as _ToolCallSplitter,  # noqa: E402
                                              resolve_tool_choice as _resolve_tool_choice)

N_CTX = 1024   # the same as the other LangChain test modules: one model load for all of them


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def now() -> str:
    """The current time."""
    return "12:00"


ADD_SPEC = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                             "parameters": {"type": "object",
                                                            "properties": {"a": {"type": "integer"},
                                                                           "b": {"type": "integer"}},
                                                            "required": ["a", "b"]}}}


# --- no model needed -----------------------------------------------------------------------------------------
def test_messages_convert_to_template_dicts():
    messages = [
        SystemMessage("Be brief."),
        HumanMessage([{"type": "text", "text": "What is "}, {"type": "text", "text": "1 + 2?"}]),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("3", tool_call_id="c1", name="add"),
        AIMessage("It is 3."),
        HumanMessage("Thanks"),
    ]
    assert convert_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "add"},
        {"role": "assistant", "content": "It is 3."},
        {"role": "user", "content": "Thanks"},
    ]


def test_non_text_content_is_refused():
    image = HumanMessage([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])
    with pytest.raises(ValueError, match="text-only"):
        convert_messages([image])


def test_splitter_streams_text_and_whole_calls():
    splitter = _ToolCallSplitter(parse_calls=True, tool_names=["add"])
    pieces = []
    reply = 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> Done <tool'
    for i in range(0, len(reply), 3):   # three characters at a time, as tokens would split it
        pieces += splitter.feed(reply[i:i + 3])
    pieces += splitter.finish()
    text = "".join(value for kind, value in pieces if kind == "text")
    calls = [value for kind, value in pieces if kind == "call"]
    assert calls == [{"name": "add", "arguments": {"a": 1, "b": 2}}]
    assert text == "Sure. Done <tool"   # a held partial marker that never completed comes out as text


def test_splitter_repairs_bare_keys_and_reads_bare_json_calls():
    splitter = _ToolCallSplitter(parse_calls=True, tool_names=["add"])
    assert splitter.feed('<tool_call>\n{"name": "add", "arguments": {a: 1, b: 2}}\n</tool_call>') == \
        [("call", {"name": "add", "arguments": {"a": 1, "b": 2}})]
    fenced = _ToolCallSplitter(parse_calls=True, tool_names=["add"])
    assert fenced.feed('```json\n{"name": "add", "arguments": {"a": 5, "b": 6}}\n```') == []
    assert fenced.finish() == [("call", {"name": "add", "arguments": {"a": 5, "b": 6}})]
    unknown = _ToolCallSplitter(parse_calls=True, tool_names=["add"])
    unknown.feed('{"name": "delete_everything", "arguments": {}}')
    assert unknown.finish() == [("text", '{"name": "delete_everything", "arguments": {}}')]


def test_splitter_holds_calls_the_grammar_never_saw_to_the_declared_parameters():
    """A bare JSON reply (or a block written without the tag tokens) was not under the tool-call grammar: with the
    tools given, a call with an undeclared key or without a required one stays text, as the grammar would have
    refused it; a schema that allows more keys lets them through."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    extra = '{"name": "get_weather", "arguments": {"city": "Oslo", "required": ["city"]}}'
    for reply in (extra, '{"name": "get_weather", "arguments": {}}', f"<tool_call>\n{extra}\n</tool_call>"):
        splitter = _ToolCallSplitter(parse_calls=True, tools=tools)
        pieces = splitter.feed(reply) + splitter.finish()
        assert [kind for kind, _ in pieces] == ["text"] and "".join(v for _, v in pieces) == reply, reply
    good = _ToolCallSplitter(parse_calls=True, tools=tools)
    assert good.feed('{"name": "get_weather", "arguments": {"city": "Oslo"}}') == []
    assert good.finish() == [("call", {"name": "get_weather", "arguments": {"city": "Oslo"}})]
    open_schema = [{"type": "function", "function": {**tools[0]["function"], "parameters": {
        **tools[0]["function"]["parameters"], "additionalProperties": True}}}]
    lenient = _ToolCallSplitter(parse_calls=True, tools=open_schema)
    lenient.feed(extra)
    assert lenient.finish() == [("call", {"name": "get_weather", "arguments": {"city": "Oslo", "required": ["city"]}})]


def test_splitter_end_closes_a_forced_call_and_names_the_finish_reason():
    """The streaming parser the API's chat stream and ChatGGML share: a prefilled (forced) call's opening is part
    of the reply; "stop" inside it is the </tool_call> stop string; a reply with calls finishes "tool_calls"."""
    forced = _ToolCallSplitter(parse_calls=True, tool_names=["add"],
                               prefill='<tool_call>\n{"name": "add", "arguments": ')
    assert forced.feed('{"a": 1, "b": 2}}') == []
    assert forced.end("stop") == ([("call", {"name": "add", "arguments": {"a": 1, "b": 2}})], "tool_calls")
    cut = _ToolCallSplitter(parse_calls=True, tool_names=["add"], prefill="<tool_call>\n{")
    pieces, reason = cut.end("length")   # the budget ran out inside the call: its text comes back, no call
    assert reason == "length" and pieces == [("text", "<tool_call>\n{")]
    plain = _ToolCallSplitter(parse_calls=True, tool_names=["add"])
    assert plain.feed("Hi <tool") == [("text", "Hi ")] and plain.end("stop") == ([("text", "<tool")], "stop")
    off = _ToolCallSplitter(parse_calls=False, prefill="x")
    assert off.feed("y") == [("text", "x"), ("text", "y")] and off.end(None) == ([], None)
    with pytest.raises(TypeError):
        _ToolCallSplitter(parse_calls=True, prefill=None)


def test_tool_choice_resolution_and_forced_openings():
    now_spec = {"type": "function", "function": {"name": "now", "description": "t",
                                                 "parameters": {"type": "object", "properties": {}}}}
    assert _resolve_tool_choice(None, [ADD_SPEC]) == (None, False)
    assert _resolve_tool_choice("any", [ADD_SPEC]) == ("add", True)          # one tool: that one
    assert _resolve_tool_choice("required", [ADD_SPEC, now_spec]) == (None, True)
    assert _resolve_tool_choice({"type": "function", "function": {"name": "now"}}, [ADD_SPEC, now_spec]) == \
        ("now", True)
    with pytest.raises(ValueError, match="does not name a bound tool"):
        _resolve_tool_choice("nope", [ADD_SPEC])
    with pytest.raises(ValueError, match="does not name a bound tool"):
        ChatGGML(n_ctx=N_CTX).bind_tools([add], tool_choice="nope")
    prefill, _ = forced_call_grammar([ADD_SPEC, now_spec], {"type": "function", "function": {"name": "now"}})
    assert prefill == '<tool_call>\n{"name": "now", "arguments": '
    assert forced_call_grammar([ADD_SPEC, now_spec], "required")[0] == '<tool_call>\n{"name": "'
    assert forced_call_grammar([ADD_SPEC], "auto") is None


# --- on the model ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat() -> ChatGGML:
    return ChatGGML(n_ctx=N_CTX, max_tokens=24, temperature=0)


def test_prompt_is_the_model_template_and_usage_counts_it(chat):
    messages = [SystemMessage("Answer with one word."), HumanMessage("What color is the sky?")]
    llama = chat.shared_model.llama
    tokens, _, text = llama.render_chat_prompt(convert_messages(messages))
    assert text == ("<|im_start|>system\nAnswer with one word.<|im_end|>\n"
                    "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    reply = chat.invoke(messages)
    assert "blue" in reply.text.lower()
    assert reply.usage_metadata["input_tokens"] == len(tokens)
    assert reply.usage_metadata["output_tokens"] == len(llama.tokenize(reply.text, add_bos=False)) + 1  # + <|im_end|>
    assert reply.response_metadata["model_name"] == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert reply.response_metadata["finish_reason"] == "stop"


def test_forced_tool_call_streams_as_one_call(chat):
    model = chat.bind_tools([add, now], tool_choice="add")
    full = None
    chunks = list(model.stream("Add 12 and 30."))
    for chunk in chunks:
        assert isinstance(chunk, AIMessageChunk)
        full = chunk if full is None else full + chunk
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("add", {"a": 12, "b": 30})]
    assert full.response_metadata["finish_reason"] == "tool_calls"
    assert chunks[-1].chunk_position == "last"
    result = add.invoke(full.tool_calls[0])
    assert isinstance(result, ToolMessage) and result.content == "42"


def test_structured_output_through_a_tool_call(chat):
    class Person(BaseModel):
        """A person."""
        name: str = Field(description="the person's first name")
        age: int = Field(description="age in years")

    person = chat.with_structured_output(Person).invoke("Alice is 31 years old.")
    assert person == Person(name="Alice", age=31)
    as_dict = chat.with_structured_output(Person.model_json_schema(), method="json_schema").invoke(
        "Bob is 45 years old.")
    assert as_dict == {"name": "Bob", "age": 45}
    raw = chat.with_structured_output(Person, include_raw=True).invoke("Alice is 31 years old.")
    assert raw["parsed"] == Person(name="Alice", age=31) and raw["parsing_error"] is None
    assert json.loads(json.dumps(raw["raw"].tool_calls[0]["args"])) == {"name": "Alice", "age": 31}


# --- ChatLlamaCpp's constructor parameters --------------------------------------------------------------------
def test_streaming_invoke_sends_every_token_to_callbacks():
    from langchain_core.callbacks import BaseCallbackHandler

    class Recorder(BaseCallbackHandler):
        def __init__(self):
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:
            self.tokens.append(token)

    recorder = Recorder()
    chat = ChatGGML(n_ctx=N_CTX, max_tokens=6, temperature=0, callbacks=[recorder], verbose=False)
    assert chat.streaming is True   # ChatLlamaCpp's default
    reply = chat.invoke("Say hello.")
    assert len([t for t in recorder.tokens if t]) > 1 and "".join(recorder.tokens) == reply.content
    quiet = Recorder()
    still = ChatGGML(n_ctx=N_CTX, max_tokens=6, temperature=0, callbacks=[quiet], streaming=False, verbose=False)
    assert still.invoke("Say hello.").content == reply.content and quiet.tokens == []


def test_construction_checks_and_client(tmp_path):
    from ggml_backend import Llama
    chat = ChatGGML(n_ctx=N_CTX, verbose=False)
    assert isinstance(chat.client, Llama) and chat.client.n_ctx() == N_CTX
    assert (chat.n_batch, chat.seed, chat.repeat_penalty, chat.max_tokens, chat.temperature) == (512, -1, 1.1, 256, 0.8)
    with pytest.raises(ValueError, match="Could not load the model from path"):
        ChatGGML(model_path=str(tmp_path / "missing.gguf"))
    # inert ones are accepted and share the model; LangChain's standard timeout / max_retries too
    same = ChatGGML(n_ctx=N_CTX, f16_kv=False, n_gpu_layers=99, use_mlock=True, timeout=30, max_retries=3,
                    verbose=False)
    assert same.client is chat.client
    assert ChatGGML(n_ctx=N_CTX, model_kwargs={"chat_format": "chatml"}, verbose=False).client.chat_format == "chatml"
    with pytest.raises(TypeError, match="unknown Llama parameter"):
        ChatGGML(n_ctx=N_CTX, model_kwargs={"bogus": True})
    for refused, message in (({"suffix": "x"}, "text-completion"), ({"echo": True}, "text-completion"),
                             ({"vocab_only": True}, "vocab_only"), ({"lora_path": "a.bin"}, "LoRA")):
        with pytest.raises(ValueError, match=message):
            ChatGGML(n_ctx=N_CTX, verbose=False, **refused)


def test_grammar_holds_every_reply_and_logprobs_come_in_chat_shape():
    chat = ChatGGML(n_ctx=N_CTX, max_tokens=4, temperature=1.0, grammar='root ::= "yes" | "no"', verbose=False)
    assert chat.invoke("Is water wet?").content in ("yes", "no")
    with pytest.raises(ValueError, match="give one or the other"):
        chat.bind_tools([add], tool_choice="add").invoke("1 + 2?")
    result = ChatGGML(n_ctx=N_CTX, max_tokens=3, temperature=0, logprobs=2, verbose=False).generate(
        [[HumanMessage("Say hi.")]])
    content = result.generations[0][0].generation_info["logprobs"]["content"]
    assert len(content) == 3 and all(len(entry["top_logprobs"]) == 2 for entry in content)


def test_model_at_call_time_chooses_another_model_file(chat):
    """``model=`` at invoke time runs another model file (the standard suite's own override test skips: it wants
    the value inside model_name, which is the file's stem here)."""
    from ggml_backend.default_model import gemma_model_path
    gemma = str(gemma_model_path())
    reply = chat.invoke("Say hi.", model=gemma, max_tokens=4)
    assert reply.response_metadata["model_name"] == Path(gemma).stem
    assert chat.invoke("Say hi.", max_tokens=4).response_metadata["model_name"] != Path(gemma).stem
