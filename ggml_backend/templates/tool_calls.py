"""Tool calls in a model's reply (Qwen2.5 / Hermes style ``<tool_call>{json}</tool_call>`` blocks), for the
API, the server and LangChain alike:

* ``parse_tool_calls``: a whole reply's blocks into (text, calls), strictly;
* ``ToolCallSplitter``: a streamed reply into text pieces and each call as soon as its block closes, lenient with
  what small models write instead (a bare JSON call, a ```json fence, unquoted keys); with a forced call's
  ``prefill`` and ``end(finish_reason)`` it is the whole streaming parser the API's chat stream and LangChain's
  ``ChatGGML`` share;
* ``resolve_tool_choice``: what ``tool_choice`` forces (generation/grammar.py's ``forced_call_grammar`` then
  constrains the reply to that call).
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

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



def resolve_tool_choice(tool_choice: Any, tools: list[dict]) -> tuple[str | None, bool]:
    """(name of the tool to force or None, whether some call is forced) for OpenAI's / LangChain's
    ``tool_choice``: None, "auto", "none", "any"/"required", a tool's name, or {"function": {"name": ...}}."""
    names = [tool["function"]["name"] for tool in tools]
    if tool_choice in (None, "auto", "none", False):
        return None, False
    if tool_choice in ("any", "required", True):
        if not names:
            raise ValueError(f"tool_choice={tool_choice!r} needs at least one bound tool")
        return (names[0] if len(names) == 1 else None), True
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"tool_choice {tool_choice!r} does not name a bound tool (bound: {', '.join(names) or 'none'})")
    return name, True


# --- streaming tool calls -------------------------------------------------------------------------------------
class ToolCallSplitter:
    """Reply text in, pieces out: ("text", str) outside ``<tool_call>`` blocks, ("call", {...}) for each complete
    block. Text that may be the start of a block is held back until it is clear either way; a block that is not a
    valid call (or never closes) comes out as text, so nothing the model wrote is lost.

    ``tools`` (OpenAI's tool list) gives the names and each tool's parameters schema: a call whose arguments have
    keys the schema does not declare (unless its ``additionalProperties`` allows them) or lack a required one is
    not a call, as the tool-call grammar would not have let it through; this holds the calls the grammar never saw
    (a bare JSON reply, a block written without the tag tokens) to the same rule. ``tool_names`` alone: names only."""

    def __init__(self, parse_calls: bool, tool_names: Sequence[str] = (), *, prefill: str = "",
                 tools: Sequence[dict] = ()):
        if not isinstance(prefill, str):
            raise TypeError(f"prefill must be a string, got {type(prefill).__name__}")
        self.parse_calls = parse_calls
        self.parameters = {tool["function"]["name"]: tool["function"].get("parameters") for tool in tools}
        self.tool_names = list(tool_names) + [name for name in self.parameters if name not in tool_names]
        self._held = ""
        self.in_call = False
        self.n_calls = 0
        self._seen_text = False
        self._maybe_bare_call = False
        # A forced call's opening, written into the prompt by us rather than by the model: it is part of the
        # reply all the same, and its pieces come out with the first feed (or the end)
        self.prefill = prefill
        self._pending = self._feed(prefill) if prefill else []

    def _fits(self, call: dict) -> bool:
        return _fits_parameters(call["arguments"], self.parameters.get(call["name"]))

    def _take_pending(self) -> list[tuple[str, Any]]:
        pending, self._pending = self._pending, []
        return pending

    def feed(self, text: str) -> list[tuple[str, Any]]:
        return self._take_pending() + self._feed(text)

    def end(self, finish_reason: str | None) -> tuple[list[tuple[str, Any]], str | None]:
        """The reply is over: (the last pieces, the finish reason to report). With a prefilled (forced) call, a
        "stop" while still inside the call is the ``</tool_call>`` stop string that ended it, so the block is
        closed here; a reply that made calls and stopped by itself reports "tool_calls", as OpenAI's."""
        pieces = self._take_pending()
        if self.prefill and finish_reason == "stop" and self.in_call:
            pieces += self._feed(CALL_CLOSE)
        pieces += self.finish()
        if self.n_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return pieces, finish_reason

    def _feed(self, text: str) -> list[tuple[str, Any]]:
        if not self.parse_calls:
            return [("text", text)] if text else []
        self._held += text
        if not self._seen_text and self._held.strip():
            # Small models sometimes answer with the call as a bare JSON object (or a ```json block) instead of
            # a <tool_call> block: a reply that starts that way is held whole and judged at the end.
            self._seen_text = True
            self._maybe_bare_call = self._held.lstrip().startswith(("{", "```"))
        if self._maybe_bare_call:
            return []
        pieces = []
        while True:
            if self.in_call:
                end = self._held.find(CALL_CLOSE)
                if end < 0:
                    return pieces
                block = self._held[:end + len(CALL_CLOSE)]
                self._held = self._held[end + len(CALL_CLOSE):]
                self.in_call = False
                calls = [call for call in _calls_in_block(block, self.tool_names) if self._fits(call)]
                if calls:
                    self.n_calls += 1
                    pieces.append(("call", calls[0]))
                else:
                    pieces.append(("text", block))
                continue
            start = self._held.find(CALL_OPEN)
            if start >= 0:
                if start:
                    pieces.append(("text", self._held[:start]))
                self._held = self._held[start:]
                self.in_call = True
                continue
            keep = _partial_suffix(self._held, CALL_OPEN)
            if len(self._held) > keep:
                pieces.append(("text", self._held[:len(self._held) - keep]))
                self._held = self._held[len(self._held) - keep:]
            return pieces

    def finish(self) -> list[tuple[str, Any]]:
        """What is held, as pieces (a block that never closed is text); ``end`` also settles the finish reason."""
        pending = self._take_pending()
        held, self._held, self.in_call = self._held, "", False
        if self._maybe_bare_call:
            self._maybe_bare_call = False
            calls = _bare_calls(held, self.tool_names)
            if calls and all(self._fits(call) for call in calls):
                self.n_calls += len(calls)
                return pending + [("call", call) for call in calls]
            return pending + self._feed(held) + self.finish()
        return pending + ([("text", held)] if held else [])


_BARE_KEY = re.compile(r'([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)(\s*:)')
_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)


def _loads_lenient(text: str) -> Any:
    """json.loads, else json.loads after quoting bare object keys ({setup: "..."}, a small model's slip)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(_BARE_KEY.sub(r'\1"\2"\3', text))


def _as_call(data: Any, tool_names: Sequence[str]) -> dict | None:
    if not isinstance(data, dict) or data.get("name") not in tool_names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = _loads_lenient(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    arguments = {} if arguments is None else arguments
    return {"name": data["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def _fits_parameters(arguments: dict, schema: dict | None) -> bool:
    """Whether a call's arguments have only the keys its tool's parameters schema declares (unless the schema's
    ``additionalProperties`` allows more: the tool-call grammar's default is that it does not) and every required
    one. No schema: anything goes. Values are not checked here (the grammar checks those on the calls it holds)."""
    if not isinstance(schema, dict):
        return True
    declared = schema.get("properties") or {}
    if schema.get("additionalProperties", False) is False and any(key not in declared for key in arguments):
        return False
    return all(key in arguments for key in schema.get("required") or [])


def _calls_in_block(block: str, tool_names: Sequence[str]) -> list[dict]:
    """The call in one <tool_call> block: strict JSON first (the engine's parser), then bare keys repaired."""
    _, calls = parse_tool_calls(block)
    if calls:
        return calls
    body = block[len(CALL_OPEN):-len(CALL_CLOSE)].strip()
    try:
        call = _as_call(_loads_lenient(body), tool_names)
    except json.JSONDecodeError:
        return []
    return [call] if call else []


def _bare_calls(text: str, tool_names: Sequence[str]) -> list[dict]:
    """A whole reply that is only calls written as bare JSON, {"name": <a bound tool>, "arguments": {...}}, one
    object or one per line, possibly in a code fence; [] if any part of it is something else."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    for candidates in ([body], [line for line in body.splitlines() if line.strip()]):
        try:
            calls = [_as_call(_loads_lenient(candidate), tool_names) for candidate in candidates]
        except json.JSONDecodeError:
            continue
        if calls and all(calls):
            return calls
    return []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
