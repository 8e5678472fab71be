"""What the three dialects share: reading a JSON body into checked fields, the sampling settings every dialect
accepts, and running a generation in a slot (waiting in line, streaming, collecting, stopping when the client
goes)."""
from __future__ import annotations

import json
import math
from contextlib import aclosing

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request

from .errors import APIError
from .slots import SlotPool, Ticket

#: llama-cpp-python's server defaults, which its users' clients expect when they send nothing
DEFAULT_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "typical_p": 1.0, "tfs_z": 1.0,
                    "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                    "mirostat_mode": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "penalize_nl": True}
#: how long a stream may take to end once the server is told to stop (server/__init__.py ends its generation at
#: once; the grace lets the stream send its last events instead of being cut)
SHUTDOWN_GRACE_S = 5
#: seconds between keep-alive comments on a quiet stream (a long prompt, a wait in line), for proxies
PING_S = 15
#: the longest list of stop strings and the longest stop string a request may give
MAX_STOPS, MAX_STOP_CHARS = 32, 1000
_MISSING = object()


def event_stream(events) -> EventSourceResponse:
    """Server-sent events from an async generator of {"data": ...} (and "event") dicts, in every dialect."""
    return EventSourceResponse(events, sep="\n", ping=PING_S, shutdown_grace_period=SHUTDOWN_GRACE_S)


async def read_json(request: Request) -> dict:
    """The request's JSON object (400 for anything else)."""
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


class Body:
    """Typed reads of a request's fields; a wrong type or range is a 400 naming the field."""

    def __init__(self, data: dict):
        self.data = data

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def _raw(self, names):
        for name in names:
            if self.data.get(name) is not None:
                return name, self.data[name]
        return names[0], _MISSING

    def int(self, *names, default=None, low=None, high=None):
        name, value = self._raw(names)
        if value is _MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)[:60]}", param=name)
        if (low is not None and value < low) or (high is not None and value > high):
            raise APIError(400, f"'{name}' must be {_bounds(low, high)}, got {value}", param=name)
        return value

    def float(self, *names, default=None, low=None, high=None):
        name, value = self._raw(names)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)[:60]}", param=name)
        if (low is not None and value < low) or (high is not None and value > high):
            raise APIError(400, f"'{name}' must be {_bounds(low, high)}, got {value}", param=name)
        return float(value)

    def bool(self, *names, default=None):
        name, value = self._raw(names)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise APIError(400, f"'{name}' must be true or false, got {json.dumps(value)[:60]}", param=name)
        return value

    def str(self, *names, default=None):
        name, value = self._raw(names)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise APIError(400, f"'{name}' must be a string, got {type(value).__name__}", param=name)
        return value

    def token_ids(self, name: str, n_vocab: int) -> list[int]:
        """A list of token ids, each inside the vocabulary (absent: [])."""
        ids = self.data.get(name, [])
        return checked_token_ids(ids, n_vocab, name)

    def stops(self, *names) -> list[str]:
        name, value = self._raw(names)
        if value is _MISSING:
            return []
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError(400, f"'{name}' must be a string or a list of strings", param=name)
        stops = [s for s in stops if s]
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"'{name}': at most {MAX_STOPS} stop strings of {MAX_STOP_CHARS} characters",
                           param=name)
        return stops


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    return f">= {low}" if low is not None else f"<= {high}"


def sampling_kwargs(body: Body, n_vocab: int) -> dict:
    """Llama sampling keyword arguments from the fields OpenAI, llama-cpp-python's and llama.cpp's servers
    accept (llama.cpp's spellings too: ``mirostat``, ``repeat_last_n``, ``logit_bias`` as pairs)."""
    d = DEFAULT_SAMPLING
    kwargs = {
        "temperature": body.float("temperature", default=d["temperature"], low=0.0),
        "top_p": body.float("top_p", default=d["top_p"], low=0.0, high=1.0),
        "top_k": body.int("top_k", default=d["top_k"]),
        "min_p": body.float("min_p", default=d["min_p"], low=0.0, high=1.0),
        "typical_p": body.float("typical_p", "typical", default=d["typical_p"], low=0.0, high=1.0),
        "tfs_z": body.float("tfs_z", default=d["tfs_z"], low=0.0),
        "repeat_penalty": body.float("repeat_penalty", default=d["repeat_penalty"], low=0.0),
        "repeat_last_n": body.int("repeat_last_n", default=d["repeat_last_n"], low=-1),
        "presence_penalty": body.float("presence_penalty", default=d["presence_penalty"], low=-2.0, high=2.0),
        "frequency_penalty": body.float("frequency_penalty", default=d["frequency_penalty"], low=-2.0, high=2.0),
        "mirostat_mode": body.int("mirostat_mode", "mirostat", default=d["mirostat_mode"], low=0, high=2),
        "mirostat_tau": body.float("mirostat_tau", default=d["mirostat_tau"], low=0.0),
        "mirostat_eta": body.float("mirostat_eta", default=d["mirostat_eta"], low=0.0),
        "penalize_nl": body.bool("penalize_nl", default=d["penalize_nl"]),
        "seed": body.int("seed", default=None, low=-1, high=2 ** 64 - 1),
        "logit_bias": logit_bias(body, n_vocab),
    }
    return kwargs


def logit_bias(body: Body, n_vocab: int) -> dict | None:
    """OpenAI's ``{"token id": bias}`` or llama.cpp's ``[[token id, bias or false], ...]`` as {id: bias}."""
    value = body.data.get("logit_bias")
    if value is None or value == {} or value == []:
        return None
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(pairs, (list, type({}.items()))):
        raise APIError(400, "'logit_bias' must map token ids to numbers", param="logit_bias")
    bias = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise APIError(400, "'logit_bias' entries must be [token id, bias] pairs", param="logit_bias")
        token, amount = pair
        try:
            token = int(token)
        except (TypeError, ValueError):
            raise APIError(400, f"'logit_bias': {str(token)[:40]!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < n_vocab:
            raise APIError(400, f"'logit_bias': token id {token} is outside the vocabulary (0..{n_vocab - 1})",
                           param="logit_bias")
        if amount is False:
            amount = -math.inf
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or math.isnan(amount):
            raise APIError(400, f"'logit_bias': the bias of token {token} must be a number", param="logit_bias")
        bias[token] = float(amount)
    return bias


def checked_token_ids(ids, n_vocab: int, name: str) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError(400, f"'{name}' must be a list of token ids (integers)", param=name)
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise APIError(400, f"'{name}': token ids outside the vocabulary (0..{n_vocab - 1}): {bad[:5]}", param=name)
    return list(ids)


def check_max_tokens(requested: int | None, n_prompt: int, n_ctx: int) -> int:
    """The tokens to generate: what was asked, or the rest of the slot's context when nothing was; a request
    that cannot fit is a 400 (as OpenAI answers), not a silently shorter reply."""
    room = n_ctx - n_prompt
    if requested is None:
        if room < 1:
            raise APIError(400, f"the prompt is {n_prompt} tokens long and fills the context of {n_ctx} tokens",
                           code="context_length_exceeded")
        return room
    if n_prompt + requested > n_ctx:
        raise APIError(400, f"this slot's context holds {n_ctx} tokens; the request asks for {n_prompt + requested} "
                            f"({n_prompt} in the prompt, {requested} to generate)", code="context_length_exceeded")
    return requested


async def tokenize(pool: SlotPool, text, add_bos: bool | None = None) -> list[int]:
    """The prompt as tokens: text (special tokens parsed, as llama.cpp's server does) or a list of token ids."""
    llm = pool.llm
    if isinstance(text, list):
        return checked_token_ids(text, llm.n_vocab(), "prompt")
    if not isinstance(text, str):
        raise APIError(400, f"'prompt' must be a string or a list of token ids, got {type(text).__name__}",
                       param="prompt")
    if add_bos is None:
        add_bos = llm.tokenizer.add_bos
    return await anyio.to_thread.run_sync(lambda: llm.tokenize(text, add_bos=add_bos, special=True))


async def start(request: Request, pool: SlotPool, prompt_tokens: list[int], make_stream,
                genkey: str | None = None) -> tuple[Ticket, object]:
    """Wait for a slot (leaving the line if the client goes), then start ``make_stream(slot's Llama)`` in a
    worker thread. The Llama's own checks of the arguments become 400s."""
    ticket = pool.reserve(prompt_tokens, genkey)
    try:
        slot = await ticket.wait(request.is_disconnected)
        stream = await anyio.to_thread.run_sync(make_stream, slot.llm)
    except (ValueError, TypeError) as exc:
        ticket.release()
        raise APIError(400, str(exc)) from None
    except BaseException:
        ticket.release()
        raise
    return ticket, stream


async def collect(request: Request, pool: SlotPool, ticket: Ticket, stream) -> list[dict]:
    """Every chunk of a generation that is answered at once; a client that goes stops it."""
    from .slots import ClientGone
    chunks = []
    async with aclosing(pool.chunks(ticket, stream)) as running:
        async for chunk in running:
            chunks.append(chunk)
            if await request.is_disconnected():
                raise ClientGone()
    return chunks
