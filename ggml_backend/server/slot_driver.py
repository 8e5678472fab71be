"""The slot driver: one thread advances the generations of all of a model's slots, each in a greenlet of its own,
and runs one combined forward pass for all of them per step.

Why one thread: with a thread per slot, each of N threads woke when the combined pass ended, sampled its token,
built its chunk, handed it to the event loop and submitted its next token, and the N threads took the GIL from
each other at every one of those steps. Measured at N = 16 on a 2-core Xeon (Qwen2.5-Coder-0.5B): 8 ms between
two passes, where ``ContinuousBatcher`` in one thread needs 2 ms; the server's step was 7-13% longer than the
batcher's. Here the work between two passes runs back to back on one thread, as the batcher's does, and the event
loop gets a step's chunks in one hand-over.

How: each slot's stream (a ``Llama`` completion or chat stream, or anything iterable) runs in a greenlet on this
thread, with ``steps_on_this_thread`` so that its model steps run here rather than on the model's worker thread.
Where a generation asks the model for a pass (``Model.forward``, ``ForwardBatcher.forward_many``), its greenlet
parks (switches back to the driver with its tokens). When every greenlet has parked or finished, the driver runs
the parked tokens through ``ForwardBatcher.forward_many``, the flat combining that every context uses, so other
callers (a ``ContinuousBatcher``, a context on another thread) still share the pass, then at most one pass that
runs alone (a prompt batch of BLAS size: a long prompt goes in between the other slots' steps, one batch per
step), and resumes each greenlet with its logits, or with the pass's error. A pass's numbers do not depend on what
else it carries, so every slot gets the tokens it gets alone.

Each slot's chunks wait in an ``asyncio.Queue`` of its request (at most the generation's max_tokens: the driver
does not wait for slow clients). Closing a stream from the event loop (client gone, abort, shutdown) ends its
generation after the token in progress, as before. A stream whose model is busy (its worker thread running other
work on that ``Llama``, or a slot's previous request still finishing its step) waits in rounds while the others go
on; what else blocks inside a greenlet (a grammar's next mask not ready yet) blocks the driver for that long.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from typing import NamedTuple

import greenlet

from ..model.scheduler import steps_on_this_thread

#: how long the driver thread waits for new streams before it ends (the next stream starts a new one)
LINGER_S = 2.0

END = object()   # the item after a stream's last chunk
_PARK_ORDER = itertools.count()   # _Job.order


class StreamRun:
    """One stream run by the driver; the request's task reads its chunks with ``next()``."""

    def __init__(self, stream, loop: asyncio.AbstractEventLoop):
        self.stream = stream
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    async def next(self):
        """The next chunk, ``END`` after the last; the stream's error, raised here."""
        kind, value = await self.queue.get()
        if kind == "error":
            raise value
        return value


class _Job(NamedTuple):
    """What a parked stream waits for."""
    kind: str          # "combined" (through ``runner.forward_many``), "alone" (``runner.forward``), "wait"
    runner: object     # the ForwardBatcher, the Model, or None
    items: list        # [(tokens, cache), ...]
    every_row: bool    # the logits after each token, not only the last
    order: int         # when it parked: the alone pass parked first goes first


class _SlotGreenlet(greenlet.greenlet):
    """A stream's greenlet. Where it would run a forward pass (``Model.forward``, ``ForwardBatcher.forward_many``),
    or wait for a model that is busy (``Scheduler``), it calls ``wait_for_pass`` / ``wait_for_round`` instead."""

    def __init__(self, run: StreamRun, outbox: list, parent):
        super().__init__(self._drive, parent)
        self.run_ = run   # not ``run``: greenlet's own name for the function it runs
        self.outbox = outbox
        self.job: _Job | None = None   # while parked

    def _drive(self):
        run = self.run_
        try:
            for chunk in run.stream:
                self.outbox.append((run, ("item", chunk)))
            self.outbox.append((run, ("item", END)))
        except BaseException as exc:   # noqa: BLE001 - raised in the request's task, by next()
            self.outbox.append((run, ("error", exc)))

    def wait_for_pass(self, kind: str, runner, items, every_row: bool):
        """Park until the driver has run ``items`` ([(tokens, cache), ...]): ``kind`` "combined" through
        ``runner.forward_many`` (a ``ForwardBatcher``), with other streams' items; "alone" through
        ``runner.forward`` (the ``Model``: a prompt batch of BLAS size, or any pass of a model without a
        batcher). Returns each item's logits, as ``ForwardBatcher.forward_many`` does."""
        self.job = _Job(kind, runner, items, every_row, next(_PARK_ORDER))
        try:
            return self.parent.switch()   # resumed with the logits, or with the pass's error raised here
        finally:
            self.job = None

    def wait_for_round(self) -> None:
        """Let the other streams run one round (their passes included): a model this one waits for is busy."""
        self.wait_for_pass("wait", None, [], False)


class SlotDriver:
    """The thread that runs the streams handed to ``open`` (one driver per served model)."""

    def __init__(self, name: str = "ggml-backend slots"):
        self._name = name
        self._cond = threading.Condition()
        self._incoming: list[StreamRun] = []
        self._thread: threading.Thread | None = None
        self.passes = 0   # statistics: forward passes run

    def open(self, stream) -> StreamRun:
        """Start running ``stream`` (called on the event loop); its chunks come through the returned run."""
        run = StreamRun(stream, asyncio.get_running_loop())
        with self._cond:
            self._incoming.append(run)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return run

    # --- the driver thread ------------------------------------------------------------------------------------
    def _main(self) -> None:
        live: list[_SlotGreenlet] = []
        outbox: list = []
        try:
            with steps_on_this_thread():
                self._serve(live, outbox)
        except BaseException as exc:   # pragma: no cover - a bug here must not leave requests waiting forever
            with self._cond:
                self._thread = None
                orphans, self._incoming = self._incoming, []
            error = RuntimeError(f"the slot driver failed: {exc!r}")
            outbox.extend((g.run_, ("error", error)) for g in live if not g.dead)
            outbox.extend((run, ("error", error)) for run in orphans)
            _deliver(outbox)
            raise

    def _serve(self, live: list, outbox: list) -> None:
        main = greenlet.getcurrent()
        runnable: deque = deque()   # (greenlet, how to resume it: ("start", None), ("value", x), ("error", exc))
        while True:
            with self._cond:
                if not runnable:
                    deadline = time.monotonic() + LINGER_S
                    while not self._incoming:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._thread = None   # a stream opened from now on starts a new driver
                            return
                        self._cond.wait(left)
                for run in self._incoming:
                    g = _SlotGreenlet(run, outbox, main)
                    live.append(g)
                    runnable.append((g, ("start", None)))
                self._incoming.clear()
            # every stream goes on until it needs a forward pass or ends
            while runnable:
                g, (kind, value) = runnable.popleft()
                if kind == "start":
                    g.switch()
                elif kind == "error":
                    g.throw(value)
                else:
                    g.switch(value)
            live[:] = [g for g in live if not g.dead]
            _deliver(outbox)   # this step's chunks, in one hand-over per event loop
            parked = [g for g in live if g.job is not None]
            if parked:
                self._run_passes(parked, runnable)

    def _run_passes(self, parked: list, runnable: deque) -> None:
        """The parked streams' passes: every combined one (through its batcher, as few passes as fit), then one
        that runs alone, the longest waiting: a long prompt goes in one batch per step, and the decoding slots
        wait for one batch at a time, not the whole prompt (as ``ContinuousBatcher`` does it)."""
        by_batcher: dict = {}
        alone, waiting = [], []
        for g in parked:
            if g.job.kind == "combined":
                by_batcher.setdefault(id(g.job.runner), []).append(g)
            elif g.job.kind == "alone":
                alone.append(g)
            else:
                waiting.append(g)
        if waiting and not by_batcher and not alone:
            time.sleep(0.001)   # only streams waiting for a busy model (its worker's): no spinning meanwhile
        for group in by_batcher.values():
            batcher = group[0].job.runner
            passes, rows = [[]], 0
            for g in group:   # a stream's items stay in one pass (it asked for them together)
                n = sum(len(tokens) for tokens, _cache in g.job.items)
                if passes[-1] and rows + n > batcher.max_rows:
                    passes.append([])
                    rows = 0
                passes[-1].append(g)
                rows += n
            for members in passes:
                every_row = any(g.job.every_row for g in members)
                items = [item for g in members for item in g.job.items]
                try:
                    results = batcher.forward_many(items, every_row)
                except BaseException as exc:   # noqa: BLE001 - each stream of the pass gets it
                    runnable.extend((g, ("error", exc)) for g in members)
                    continue
                self.passes += 1
                i = 0
                for g in members:
                    mine = results[i:i + len(g.job.items)]
                    i += len(mine)
                    if every_row and not g.job.every_row:   # as the batcher gives its own jobs
                        mine = [logits[-1:] for logits in mine]
                    runnable.append((g, ("value", mine)))
        if alone:
            g = min(alone, key=lambda g: g.job.order)
            ((tokens, cache),) = g.job.items
            try:
                runnable.append((g, ("value", [g.job.runner.forward(tokens, cache, g.job.every_row)])))
                self.passes += 1
            except BaseException as exc:   # noqa: BLE001 - raised in its stream
                runnable.append((g, ("error", exc)))
        # last: what they wait for may be a step of a stream resumed above
        runnable.extend((g, ("value", None)) for g in waiting)


def _deliver(outbox: list) -> None:
    """Hand the collected (run, item) pairs to their event loops, one call per loop; then empty the outbox."""
    by_loop: dict = {}
    for run, item in outbox:
        by_loop.setdefault(run.loop, []).append((run, item))
    outbox.clear()
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:   # the event loop is closed (the server stopped): nobody reads these streams
            for run, _item in items:
                close = getattr(run.stream, "close", None)
                if close is not None:
                    close()


def _put_all(items) -> None:
    for run, item in items:
        run.queue.put_nowait(item)
