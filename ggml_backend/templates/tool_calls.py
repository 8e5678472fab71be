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


TOOL_CALL_OPEN = "<tool_call>"


class ToolCallSplitter:
    """Streamed reply text in, the part to show now out; tool calls at the end (a streamed chat with tools).

    Text passes through until a ``<tool_call>`` tag opens; a tail that could be the start of one is held back
    until the next piece says. From the tag on, the reply is kept and parsed when it ends (``finish``), so a client
    never sees half a call as text. What the blocks do not parse as calls comes back as text then: nothing the
    model wrote is lost.
    """

    def __init__(self):
        self._held = ""          # text not shown yet: a possible tag start, or everything from the tag on
        self._in_calls = False

    def feed(self, text: str) -> str:
        self._held += text
        if self._in_calls:
            return ""
        at = self._held.find(TOOL_CALL_OPEN)
        if at >= 0:
            self._in_calls = True
            shown, self._held = self._held[:at], self._held[at:]
            return shown
        keep = 0
        for n in range(min(len(TOOL_CALL_OPEN) - 1, len(self._held)), 0, -1):
            if TOOL_CALL_OPEN.startswith(self._held[-n:]):
                keep = n
                break
        shown = self._held[:len(self._held) - keep]
        self._held = self._held[len(self._held) - keep:]
        return shown

    def finish(self) -> tuple[str, list[dict]]:
        """(the text still to show, the calls) once the reply has ended."""
        held, self._held = self._held, ""
        if not self._in_calls:
            return held, []
        return parse_tool_calls(held)
