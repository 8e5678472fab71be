"""Reading tool calls out of a model's reply (Qwen2.5 / Hermes style ``<tool_call>{json}</tool_call>`` blocks)."""
from __future__ import annotations

import json
import re

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the reply's text outside the tool-call blocks, [{"name": str, "arguments": dict}, ...]).

    A block whose JSON is not a ``{"name": ..., "arguments": {...}}`` object is model output gone wrong, not a call:
    it stays in the text so that nothing the model wrote is silently lost.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls expects a string, got {type(text).__name__}")
    calls: list[dict] = []
    kept: list[str] = []
    position = 0
    for match in _TOOL_CALL_BLOCK.finditer(text):
        call = _parse_call(match.group(1))
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    return "".join(kept).strip(), calls


def _parse_call(body: str) -> dict | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return {"name": data["name"], "arguments": arguments}
