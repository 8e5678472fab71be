"""Where replies come from: the model loaded in this process (``LocalBackend``), or a ``ggml-backend serve`` or
any OpenAI-compatible server (``RemoteBackend``, ``ggml-backend webui --api URL``).

Both stream the reply so far as it grows, honour Stop after every piece, keep stop strings (and their first
characters) off the page, and fill a ``chat.ReplyStats`` for the status line.

The remote one speaks OpenAI's streaming API with httpx: ``/v1/chat/completions`` when the server's own chat
template writes the prompt (instruct mode with "(from the model file)"), ``/v1/completions`` with the prompt the
page wrote for everything else (chat modes, Continue, "Start reply with", Impersonate, the Default and Notebook
tabs). llama.cpp's sampling fields (``top_k``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``) are always sent
(servers' defaults differ), ``ignore_eos`` and ``grammar`` when set; OpenAI-compatible local servers (llama.cpp,
llama-cpp-python, vLLM, text-generation-webui) take them. What the server sends is bounded: a line
of at most MAX_SSE_LINE_BYTES, a reply of at most MAX_REPLY_CHARS, an error body read to 4 KiB; Stop closes the
stream, which ends the generation on servers that watch for it (ggml-backend serve and llama-server do).
"""
from __future__ import annotations

import json
from typing import Callable, Iterator

from ggml_backend.generation import TextStreamer

from . import chat
from .settings import GenerationSettings

MAX_SSE_LINE_BYTES = 1024 * 1024
MAX_REPLY_CHARS = 200_000
CONNECT_TIMEOUT_S = 10.0
#: the longest wait for the next piece of a stream (a busy server queues requests before it starts)
READ_TIMEOUT_S = 600.0


class LocalBackend:
    """The ModelManager's current model, in this process."""
    remote = False

    def __init__(self, manager):
        self.manager = manager

    def describe(self) -> str:
        return self.manager.describe()

    def n_ctx(self) -> int | None:
        return self.manager.require().n_ctx()

    def count_tokens(self, text: str, settings: GenerationSettings) -> int:
        return len(chat.prompt_tokens(self.manager.require(), text, settings))

    def prompt_budget(self, settings: GenerationSettings) -> int | None:
        return chat.prompt_budget(self.manager.require(), settings)

    def stream_prompt(self, prompt: str, settings: GenerationSettings, stops: list[str],
                      should_stop: Callable[[], bool], stats: chat.ReplyStats) -> Iterator[str]:
        yield from chat.stream_reply(self.manager.require(), prompt, settings, stops, should_stop=should_stop,
                                     stats=stats)


class RemoteBackend:
    """An OpenAI-compatible server at ``url`` (``http://host:port`` or ``.../v1``); ``api_key`` goes in the
    Authorization header; ``model`` names the model in requests (default: the server's first)."""
    remote = True

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, *, transport=None):
        import httpx
        url = (url or "").strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--api must be an http:// or https:// URL, got {url!r}")
        self.base = url[:-3] if url.endswith("/v1") else url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base, headers=headers, transport=transport,
                                   timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        self.model = model or self._first_model()
        self._n_ctx = self._read_n_ctx()

    # ---- what the server says about itself ----------------------------------------------------------------------
    def _get_json(self, path: str):
        response = self.client.get(path, timeout=CONNECT_TIMEOUT_S)
        if response.status_code >= 400 or len(response.content) > MAX_SSE_LINE_BYTES:
            return None
        try:
            return response.json()
        except ValueError:
            return None

    def _first_model(self) -> str:
        import httpx
        try:
            response = self.client.get("/v1/models", timeout=CONNECT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise ValueError(f"cannot reach the API at {self.base}: {exc}") from None
        if response.status_code in (401, 403):
            raise ValueError(f"the API at {self.base} refused the key ({response.status_code}): pass --api-key")
        try:
            models = response.json().get("data") or []
            return str(models[0]["id"])
        except (ValueError, AttributeError, LookupError, TypeError):
            raise ValueError(f"the API at {self.base} answered /v1/models with {response.status_code} and no "
                             "model list: is it an OpenAI-compatible server?") from None

    def _read_n_ctx(self) -> int | None:
        import httpx
        try:   # llama.cpp's /props (ggml-backend serve has it); other servers: unknown
            props = self._get_json("/props")
        except httpx.HTTPError:
            return None
        if isinstance(props, dict):
            settings = props.get("default_generation_settings") or {}
            for value in (settings.get("n_ctx") if isinstance(settings, dict) else None, props.get("n_ctx")):
                if isinstance(value, int) and value > 0:
                    return value
        return None

    def describe(self) -> str:
        return (f"**Remote API**: `{self.base}`, model `{self.model}`" +
                (f", context {self._n_ctx:,} tokens" if self._n_ctx else "") +
                ". Models are loaded on that server, not here.")

    def n_ctx(self) -> int | None:
        return self._n_ctx

    def count_tokens(self, text: str, settings: GenerationSettings) -> int | None:
        """The server's count (llama.cpp's ``/tokenize``), or None when it has no such route."""
        import httpx
        try:
            response = self.client.post("/tokenize", json={"content": text, "add_special": settings.add_bos_token},
                                        timeout=CONNECT_TIMEOUT_S * 3)
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

    def prompt_budget(self, settings: GenerationSettings) -> None:
        return None   # counting every row through the network is too slow: the server cuts or refuses

    # ---- streaming ------------------------------------------------------------------------------------------------
    def _sampling(self, settings: GenerationSettings, stops: list[str]) -> dict:
        body = {"model": self.model, "stream": True, "max_tokens": int(settings.max_new_tokens),
                "temperature": settings.temperature, "top_p": settings.top_p,
                "stream_options": {"include_usage": True}}
        if stops:
            body["stop"] = stops[:4]   # OpenAI takes four; the rest are cut here
        if settings.seed != -1:
            body["seed"] = int(settings.seed)
        # llama.cpp's sampler fields, always: servers' defaults differ (llama-cpp-python's repeat_penalty is 1.1),
        # and the reply should be the one the page's values give
        body.update(top_k=int(settings.top_k), min_p=settings.min_p, repeat_penalty=settings.repetition_penalty,
                    repeat_last_n=int(settings.repetition_penalty_range))
        if settings.ban_eos_token:
            body["ignore_eos"] = True
        if settings.grammar_string.strip():
            body["grammar"] = settings.grammar_string
        return body

    def stream_prompt(self, prompt: str, settings: GenerationSettings, stops: list[str],
                      should_stop: Callable[[], bool], stats: chat.ReplyStats) -> Iterator[str]:
        body = {**self._sampling(settings, stops), "prompt": prompt}
        yield from self._stream("/v1/completions", body, stops, should_stop, stats)

    def stream_chat(self, messages: list[dict], settings: GenerationSettings, stops: list[str],
                    should_stop: Callable[[], bool], stats: chat.ReplyStats) -> Iterator[str]:
        body = {**self._sampling(settings, stops), "messages": messages}
        yield from self._stream("/v1/chat/completions", body, stops, should_stop, stats)

    def _stream(self, path: str, body: dict, stops: list[str], should_stop, stats: chat.ReplyStats):
        import httpx
        stats.n_ctx = self._n_ctx
        streamer = TextStreamer(stops)
        try:
            with self.client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    raise ValueError(f"the API at {self.base} answered {response.status_code}: "
                                     f"{_error_text(response)}")
                for event in _sse_events(response):
                    if "error" in event:
                        error = event["error"]
                        message = error.get("message") if isinstance(error, dict) else error
                        raise ValueError(f"the API at {self.base} reported an error: {str(message)[:500]}")
                    usage = event.get("usage")
                    if isinstance(usage, dict):
                        if isinstance(usage.get("prompt_tokens"), int):
                            stats.prompt_tokens = usage["prompt_tokens"]
                        if isinstance(usage.get("completion_tokens"), int):
                            stats.tokens = usage["completion_tokens"]
                    piece = _piece(event)
                    if piece:
                        stats.token()
                        if streamer.feed(piece.encode("utf-8")):
                            yield streamer.text
                        if len(streamer.text) > MAX_REPLY_CHARS:
                            raise ValueError(f"the API at {self.base} sent over {MAX_REPLY_CHARS:,} characters")
                    if streamer.stopped or should_stop():
                        break
        except httpx.HTTPError as exc:
            raise ValueError(f"the API at {self.base}: {type(exc).__name__}: {str(exc)[:300]}") from None
        finally:
            stats.finish()
        if streamer.finish():
            yield streamer.text
        elif not streamer.text:
            yield ""

    def close(self) -> None:
        self.client.close()


def _piece(event: dict) -> str:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _error_text(response) -> str:
    data = b""
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) >= 4096:
            break
    text = data[:4096].decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    except (ValueError, AttributeError):
        pass
    return text[:500]


def _sse_events(response) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream's ``data:`` lines, until ``[DONE]``; lines are bounded."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                event = json.loads(payload)
            except ValueError:
                raise ValueError(f"the API sent a stream line that is not JSON: {payload[:200]!r}") from None
            if isinstance(event, dict):
                yield event
        if len(buffer) > MAX_SSE_LINE_BYTES:
            raise ValueError(f"the API sent a stream line over {MAX_SSE_LINE_BYTES:,} bytes")
