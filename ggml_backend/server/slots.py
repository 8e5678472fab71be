"""Parallel slots: N contexts of one model (``Llama.new_context``), each with its own KV cache, that requests
borrow one at a time; requests beyond the slots wait in line, first come first served.

* A request is given the free slot whose evaluated tokens share the longest prefix with its prompt, so a follow-up
  turn of a chat finds its conversation still in the KV cache and evaluates only the new turn (llama.cpp's
  server chooses slots the same way).
* Slots decoding at the same time share forward passes: one thread, the pool's ``SlotDriver``
  (slot_driver.py), advances every slot's generation and runs one pass through the model's ``ForwardBatcher``
  (model/batching.py) for all their tokens per step; each slot gives exactly what it gives alone. The
  ``ContinuousBatcher`` (continuous_batching.py) that ``n > 1`` requests run on submits its sequences there too,
  so one mechanism combines everything.
* Everything here runs on the event loop's thread: no lock. The driver hands each generation's chunks to the
  request's task; nothing is held across a ``yield``.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import anyio

from .config import ModelConfig
from .errors import APIError, ServerBusy
from .slot_driver import END, SlotDriver


@dataclass
class Metrics:
    """Totals since start, for /metrics, /slots and KoboldCpp's /api/extra/perf."""
    requests_total: int = 0
    requests_failed: int = 0
    prompt_tokens_total: int = 0
    tokens_predicted_total: int = 0
    prompt_seconds_total: float = 0.0
    predicted_seconds_total: float = 0.0
    last_prompt_seconds: float = 0.0
    last_predicted_seconds: float = 0.0
    last_tokens_predicted: int = 0
    last_stop_reason: str = ""


@dataclass
class Slot:
    id: int
    llm: object                       # a Llama context
    busy: bool = False
    task_id: int | None = None
    genkey: str | None = None         # KoboldCpp's generation key of the request in it
    n_prompt: int = 0
    t_start: float = 0.0
    t_first: float | None = None      # when the first chunk came (the prompt is evaluated by then)
    stream: object = None             # the generation running in it (closed to abort)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def n_past(self) -> int:
        return int(self.llm.n_tokens)

    @property
    def n_decoded(self) -> int:
        return max(0, self.n_past - self.n_prompt) if self.busy else 0

    def common_prefix(self, tokens: list[int]) -> int:
        cached = self.llm.input_ids[:self.llm.n_tokens]
        n = min(len(cached), len(tokens))
        i = 0
        while i < n and cached[i] == tokens[i]:
            i += 1
        return i


class Ticket:
    """A request's place: waiting in line, then holding a slot until ``release``."""

    def __init__(self, pool: "SlotPool", prompt_tokens: list[int], genkey: str | None):
        self.pool = pool
        self.prompt_tokens = prompt_tokens
        self.genkey = genkey
        self.slot: Slot | None = None
        self.granted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.released = False

    async def wait(self, is_disconnected=None, poll_s: float = 0.25) -> Slot:
        """The slot, once it is this request's turn. ``is_disconnected`` (an async callable) is asked every
        ``poll_s`` while waiting: a client gone in the meantime leaves the line (``ClientGone``)."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(self.granted), poll_s)
            except asyncio.TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    self.release()
                    raise ClientGone() from None
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self)


class ClientGone(Exception):
    """The client disconnected before its request got a slot."""


class SlotPool:
    """The slots of one model and the line of requests waiting for them."""

    def __init__(self, llm, config: ModelConfig, queue_limit: int):
        self.config = config
        self.alias = config.alias
        self.llm = llm                    # slot 0; the others are contexts on its weights
        self.n_ctx = llm.n_ctx()
        self.slots = [Slot(0, llm)] + [Slot(i, llm.new_context(self.n_ctx)) for i in range(1, config.n_parallel)]
        self.queue_limit = queue_limit
        self.waiting: deque[Ticket] = deque()
        self.metrics = Metrics()
        self.driver = SlotDriver(f"ggml-backend slots of {self.alias}")
        self.closing = False
        self._next_task = 0

    # --- the line -----------------------------------------------------------------------------------------
    def reserve(self, prompt_tokens: list[int], genkey: str | None = None) -> Ticket:
        """A place for a request: a slot now if one is free and nobody waits, else the end of the line
        (``ServerBusy`` when the line is full)."""
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if len(prompt_tokens) > self.n_ctx:
            raise APIError(400, f"the prompt is {len(prompt_tokens)} tokens long; the context of each slot of "
                                f"model {self.alias!r} holds {self.n_ctx}", code="context_length_exceeded")
        ticket = Ticket(self, prompt_tokens, genkey)
        free = [s for s in self.slots if not s.busy]
        if free and not self.waiting:
            self._grant(ticket, free)
        elif len(self.waiting) >= self.queue_limit:
            raise ServerBusy(self.queue_limit)
        else:
            self.waiting.append(ticket)
        return ticket

    def _grant(self, ticket: Ticket, free: list[Slot]) -> None:
        # the longest shared prefix wins; among equals the least recently used (its cache is the least likely
        # to be wanted again)
        slot = max(free, key=lambda s: (s.common_prefix(ticket.prompt_tokens), -s.last_used))
        slot.busy = True
        self._next_task += 1
        slot.task_id = self._next_task
        slot.genkey = ticket.genkey
        slot.n_prompt = len(ticket.prompt_tokens)
        slot.t_start = time.monotonic()
        slot.t_first = None
        slot.stream = None
        ticket.slot = slot
        ticket.granted.set_result(slot)

    def _release(self, ticket: Ticket) -> None:
        slot = ticket.slot
        if slot is None:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            if not ticket.granted.done():
                ticket.granted.cancel()
            return
        if slot.stream is not None:
            slot.stream.close()
        slot.busy = False
        slot.stream = None
        slot.genkey = None
        slot.last_used = time.monotonic()
        while self.waiting:
            nxt = self.waiting.popleft()
            if not nxt.released:
                self._grant(nxt, [slot])
                break

    # --- running a generation in a slot ----------------------------------------------------------------------
    async def chunks(self, ticket: Ticket, stream):
        """The chunks of ``stream`` (a Llama stream running in the ticket's slot), made by the pool's driver thread,
        which runs the stream to its end with the other slots' (each next token is started as soon as the last one
        is out, without a round trip through the event loop). Leaving early (the client went, an abort,
        cancellation) closes the stream: the generation stops after the token in progress. The ticket is
        released at the end."""
        slot = ticket.slot
        slot.stream = stream
        usage, finish_reason = None, None
        run = self.driver.open(stream)
        try:
            while True:
                chunk = await run.next()
                if chunk is END:
                    break
                if slot.t_first is None:
                    slot.t_first = time.monotonic()
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or [{}]
                finish_reason = choices[0].get("finish_reason") or finish_reason
                yield chunk
        except Exception:   # not a client leaving (GeneratorExit, cancellation): the generation failed
            self.metrics.requests_failed += 1
            raise
        finally:
            stream.close()   # the driver ends the generation after the token in progress
            self._record(slot, usage, finish_reason)
            ticket.release()

    def _record(self, slot: Slot, usage: dict | None, finish_reason: str | None) -> None:
        m = self.metrics
        now = time.monotonic()
        first = slot.t_first or now
        n_predicted = usage["completion_tokens"] if usage else slot.n_decoded
        m.requests_total += 1
        m.prompt_tokens_total += slot.n_prompt
        m.tokens_predicted_total += n_predicted
        m.prompt_seconds_total += first - slot.t_start
        m.predicted_seconds_total += now - first
        m.last_prompt_seconds = first - slot.t_start
        m.last_predicted_seconds = now - first
        m.last_tokens_predicted = n_predicted
        m.last_stop_reason = finish_reason or "abort"

    def abort(self, genkey: str | None = None) -> bool:
        """Stop the generation with KoboldCpp's ``genkey`` (None: every generation); True if one was running.
        A request still waiting in line with that key leaves it."""
        found = False
        for slot in self.slots:
            if slot.busy and (genkey is None or slot.genkey == genkey) and slot.stream is not None:
                slot.stream.close()
                found = True
        for ticket in list(self.waiting):
            if genkey is None or ticket.genkey == genkey:
                ticket.release()
                found = True
        return found

    def close(self) -> None:
        """Server shutdown: every generation ends after its token in progress (its reply ends normally, with what
        it has), requests waiting in line get a 503, new ones too."""
        self.closing = True
        for ticket in list(self.waiting):
            self.waiting.remove(ticket)
            if not ticket.granted.done():
                ticket.granted.set_exception(APIError(503, "the server is shutting down", code="shutting_down"))
        for slot in self.slots:
            if slot.stream is not None:
                slot.stream.close()

    @property
    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)


class ModelRegistry:
    """The served models by alias, each loaded (with its slots) the first time a request names it."""

    def __init__(self, models: list[ModelConfig], queue_limit: int, loader=None):
        self.configs = {m.alias: m for m in models}
        self.default_alias = models[0].alias
        self.queue_limit = queue_limit
        self.pools: dict[str, SlotPool] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._loader = loader or _load_llama

    def resolve(self, name) -> ModelConfig:
        """The model a request's ``model`` field names (None or empty: the first one); 404 for others."""
        if name is None or name == "":
            return self.configs[self.default_alias]
        if not isinstance(name, str):
            raise APIError(400, f"'model' must be a string, got {type(name).__name__}", param="model")
        config = self.configs.get(name)
        if config is None:
            raise APIError(404, f"the model {name!r} does not exist; this server has: "
                                f"{', '.join(self.configs)}", param="model", code="model_not_found")
        return config

    async def pool(self, name=None) -> SlotPool:
        config = self.resolve(name)
        pool = self.pools.get(config.alias)
        if pool is not None:
            return pool
        lock = self._loading.setdefault(config.alias, asyncio.Lock())
        async with lock:
            pool = self.pools.get(config.alias)
            if pool is None:
                try:
                    llm = await anyio.to_thread.run_sync(self._loader, config)
                except (OSError, ValueError, MemoryError) as exc:
                    raise APIError(500, f"could not load model {config.alias!r}: {exc}") from None
                pool = SlotPool(llm, config, self.queue_limit)
                self.pools[config.alias] = pool
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


def _load_llama(config: ModelConfig):
    from ..api import Llama
    from ..speculative import LlamaPromptLookupDecoding
    draft_model = LlamaPromptLookupDecoding(num_pred_tokens=config.draft_max) if config.draft_max else None
    return Llama(config.path, n_ctx=config.slot_ctx, n_threads=config.n_threads, chat_format=config.chat_template,
                 type_k=config.cache_type_k, type_v=config.cache_type_v, n_gpu_layers=config.n_gpu_layers,
                 main_gpu=config.main_gpu, use_mmap=config.use_mmap, draft_model=draft_model, verbose=False)
