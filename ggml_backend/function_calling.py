"""``chat_format="chatml-function-calling"``: llama-cpp-python's tool-calling protocol for any ChatML model.

The system prompt lists the tools as ``functions.<name>:`` with their parameter schemas, and says to answer either
with ``message:`` and text, or with one or more ``functions.<name>:`` lines each followed by JSON arguments. The
reply is then produced in steps, each held to a grammar:

1. the opening (``tool_choice`` "auto": ``message:`` or ``functions.<name>:``; "required": a function; a named
   tool: that one, written for the model);
2. a message: free text to the end of the turn; a call: arguments valid against that tool's parameters;
3. after a call: another ``functions.<name>:`` or the end of the turn (a named tool: one call).

Without tools it is a plain ChatML chat. A reply with calls comes back as ``message.tool_calls`` (and, for a single
call, the legacy ``function_call``), finish_reason "tool_calls"; streamed, it comes as the same chunks at the end.
"""
from __future__ import annotations

import json
import time
import uuid

from .generation.grammar import LlamaGrammar

_END = "<|im_end|>"
#: the most calls one reply may make (a small model may go on calling forever)
MAX_CALLS = 8


def _system_prompt(tools: list[dict], system: str) -> str:
    lines = [system.strip()] if system.strip() else []
    lines.append("You have access to the following functions:\n")
    for tool in tools:
        fn = tool["function"]
        lines.append(f"functions.{fn['name']}:")
        if fn.get("description"):
            lines.append(f"// {fn['description']}")
        lines.append(json.dumps(fn.get("parameters") or {"type": "object", "properties": {}}, ensure_ascii=False))
        lines.append("")
    lines.append("You can respond to the user's messages with either a single message or one or more function "
                 "calls.\n\nTo respond with a message begin the message with 'message:', use the following "
                 "format:\n\nmessage:\n<message>\n\nTo respond with one or more function calls begin the message "
                 "with 'functions.<function_name>:', use the following format:\n\nfunctions.<function_name>:\n"
                 '{ "arg1": "value1", "arg2": "value2" }\nfunctions.<function_name>:\n'
                 '{ "arg1": "value1", "arg2": "value2" }')
    return "\n".join(lines)


def render_prompt(messages: list[dict], tools: list[dict] | None) -> str:
    """The ChatML prompt: the tools in the system message; earlier calls as ``functions.<name>:`` lines and tool
    results as ``tool`` turns."""
    from .templates import normalize_messages
    messages = normalize_messages(messages)
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    out = []
    if tools:
        out.append(f"<|im_start|>system\n{_system_prompt(tools, system)}{_END}\n")
    elif system:
        out.append(f"<|im_start|>system\n{system}{_END}\n")
    for m in messages:
        role = m["role"]
        if role == "system":
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"functions.{c['function']['name']}:\n"
                              f"{json.dumps(c['function']['arguments'], ensure_ascii=False)}"
                              for c in m["tool_calls"])
            out.append(f"<|im_start|>assistant\n{calls}{_END}\n")
        elif role == "assistant" and tools:
            out.append(f"<|im_start|>assistant\nmessage:\n{m['content']}{_END}\n")
        else:
            out.append(f"<|im_start|>{role}\n{m['content']}{_END}\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def _choice_grammar(names: list[str], allow_message: bool, allow_end: bool) -> LlamaGrammar:
    """The opening of the next part: ``functions.<name>:`` for a tool, ``message:``, or (``allow_end``) nothing at
    all, which lets the model end its turn (its end token is allowed where the grammar is complete)."""
    options = [json.dumps(f"functions.{name}:") for name in names]
    if allow_message:
        options.append('"message:"')
    choice = " | ".join(options)
    return LlamaGrammar.from_lark(f"start: choice{'?' if allow_end else ''}\nchoice: {choice}\n")


def chat_completion(llm, messages, tools, tool_choice, stream: bool, sampling: dict):
    """The whole protocol on ``llm`` (a Llama); ``sampling``: create_completion's keyword arguments."""
    from .templates.tool_calls import resolve_tool_choice
    tools = tools or None
    if tool_choice == "none":
        tools = None
    prompt = render_prompt(messages, tools)
    completion_id = f"chatcmpl-{uuid.uuid4()}"
    created = int(time.time())
    model = sampling.get("model") or llm.model_path
    base = dict(sampling, stream=False)
    if not tools:
        reply = llm.create_completion(prompt, **dict(base, stop=[_END] + list(base.get("stop") or [])))
        return _finish(completion_id, created, model, reply["choices"][0]["text"], [], reply["usage"],
                       reply["choices"][0]["finish_reason"], stream)
    names = [t["function"]["name"] for t in tools]
    forced_name, forced_any = resolve_tool_choice(tool_choice, tools)
    by_name = {t["function"]["name"]: t for t in tools}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    def run(text_prompt, **kw):
        out = llm.create_completion(text_prompt, **dict(base, **kw))
        for key in usage:
            usage[key] += out["usage"][key]
        return out["choices"][0]["text"], out["choices"][0]["finish_reason"]

    if forced_name is not None:
        opening = f"functions.{forced_name}:"
    else:
        opening, _ = run(prompt, max_tokens=32, temperature=0,
                         grammar=_choice_grammar(names, allow_message=not forced_any, allow_end=False))
    if opening == "message:":
        text, finish = run(prompt + "message:\n", stop=[_END] + list(base.get("stop") or []))
        return _finish(completion_id, created, model, text, [], usage, finish, stream)
    calls = []
    # a named tool makes one call (as llama-cpp-python); otherwise calls follow one another until the model ends
    # its turn, at most MAX_CALLS
    max_calls = 1 if forced_name is not None else MAX_CALLS
    while opening.startswith("functions.") and len(calls) < max_calls:
        name = opening[len("functions."):-1]
        prompt += f"{opening}\n"
        schema = dict(by_name[name]["function"].get("parameters") or {"type": "object", "properties": {}})
        schema.setdefault("additionalProperties", False)
        arguments, _ = run(prompt, grammar=LlamaGrammar.from_json_schema(schema), stop=None)
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": arguments}})
        prompt += f"{arguments}\n"
        opening, _ = run(prompt, max_tokens=32, temperature=0,
                         grammar=_choice_grammar(names, allow_message=False, allow_end=True), stop=None)
    return _finish(completion_id, created, model, None, calls, usage, "tool_calls", stream)


def _finish(completion_id, created, model, text, calls, usage, finish_reason, stream):
    message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
        if len(calls) == 1:
            message["function_call"] = dict(calls[0]["function"])
    reply = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
             "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
             "usage": usage}
    return _as_chunks(reply) if stream else reply


def _as_chunks(reply):
    """A finished reply as chat.completion.chunk dicts (the protocol's steps end before anything can be shown)."""
    base = {k: reply[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    message = reply["choices"][0]["message"]
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                "finish_reason": None}]}
    if message["content"]:
        yield {**base, "choices": [{"index": 0, "delta": {"content": message["content"]}, "logprobs": None,
                                    "finish_reason": None}]}
    for index, call in enumerate(message.get("tool_calls") or []):
        yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **call}]},
                                    "logprobs": None, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": reply["choices"][0]["finish_reason"]}], "usage": reply["usage"]}
