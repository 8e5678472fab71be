"""The model's scheduler: one worker thread runs every operation on a ``Llama``'s state (KV cache, evaluated
tokens, logits), one at a time; callers on any thread hand it work and wait for the result.

Why not a lock: a generator that holds a lock across ``yield`` keeps it in the thread that took it. Gradio advances
a stream on whichever worker thread is free and closes it from its event loop, so a thread-owned lock deadlocks
(the next step runs on another thread and waits for the lock its own stream holds), fails to release ("cannot
release un-acquired lock", the lock stays held), and an abandoned stream keeps the model forever. Here nothing is
held between steps:

* a stream is a request whose steps run on the worker only when its consumer asks for the next item, so nothing is
  computed ahead (a stream closed after a token has not evaluated it, as before) and results are those of running
  the request alone;
* a stream whose consumer is idle (busy elsewhere, or gone without closing it) while other work waits keeps the
  model for ``IDLE_GRACE_S``, then is preempted: its state is saved (``Llama.save_state``) and restored bit for
  bit when it asks again, so the results do not change;
* closing a stream, from any thread, or dropping the last reference to it, cancels its request: the worker drops
  it after the step in progress (if any) and goes on with the next request;
* two threads advancing one stream at the same moment get a ``RuntimeError`` instead of a hang or a garbled
  stream; one after the other is fine.

A thread inside ``steps_on_this_thread()`` runs its streams' steps itself whenever the model is free, instead of
handing them to the worker and waiting: the server's slot driver (server/slot_driver.py) advances every slot's
stream on its one thread, so a token costs no thread switch and no contention for the GIL. The steps are the same,
one at a time with everything else on the model (the worker waits while a step runs on a calling thread, and the
other way round).
"""
from __future__ import annotations

import queue
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .batching import driver_greenlet

#: how long a stream whose consumer has not asked for its next item keeps the model while other work waits
IDLE_GRACE_S = 0.25
#: how long the worker thread waits for new work before it ends (a later call starts a new one)
WORKER_LINGER_S = 1.0

_ITEM, _END, _ERROR = "item", "end", "error"
_BUSY_MESSAGE = "this stream is already being iterated in another thread; advance a stream from one thread at a time"

_this_thread = threading.local()   # .steps_here: streams advanced on this thread run their steps here


@contextmanager
def steps_on_this_thread():
    """Within this block, a stream advanced on the calling thread runs its steps on this thread whenever its model
    is free (else it waits for the model's worker, as outside). For a thread that drives many streams of different
    models in turn (the server's slot driver): no hand-off to a worker thread per token."""
    before = getattr(_this_thread, "steps_here", False)
    _this_thread.steps_here = True
    try:
        yield
    finally:
        _this_thread.steps_here = before


class _Request:
    """Work for the model: ``work`` is a generator advanced on the worker thread, one step per item asked for.

    ``keep_state`` says whether the model's state must be saved when another request takes the model between two
    steps (streams: yes; one-shot calls: no). ``on_end(snapshot)`` runs on the worker once the request is over,
    if it ever ran, with its saved state if it was preempted (None: its state is the live one).
    """

    def __init__(self, work: Iterator[Any], *, keep_state: bool, on_end: Callable[[Any], None] | None = None):
        self.work = work
        self.keep_state = keep_state
        self.on_end = on_end
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.demand = False        # the consumer waits for an item
        self.running = False       # the worker is computing a step of it right now
        self.started = False       # a step ran: its state is the model's live state, or in snapshot
        self.cancelled = False
        self.ended = False
        self.snapshot = None       # its saved state while another request has the model
        self.idle_since = time.monotonic()
        self.consumer_busy = threading.Lock()   # held by the thread waiting for an item


class Scheduler:
    """Runs ``_Request``s for one model on one worker thread (started on demand, ended when idle).

    ``save_state()``/``load_state(state)`` are the model's own state methods, called on the worker thread to
    preempt a stream. They are held weakly and the worker thread only lives while there is work, so a model that
    nobody uses is freed as soon as its last reference goes (no reference cycle through its scheduler).
    """

    def __init__(self, save_state: Callable[[], Any], load_state: Callable[[Any], None], name: str = "model"):
        self._save_state_ref = weakref.WeakMethod(save_state)
        self._load_state_ref = weakref.WeakMethod(load_state)
        self._name = name
        self._cond = threading.Condition()
        self._requests: list[_Request] = []   # open requests, oldest first
        self._live: _Request | None = None    # the stream whose state is the model's live state
        self._worker: threading.Thread | None = None
        self._worker_busy = False               # the worker is running a step or ending a request
        self._stepping_thread: int | None = None   # a calling thread running a step (steps_on_this_thread)
        self._worker_waits = False              # the worker has work and waits for that step to end

    # --- the callers' side ------------------------------------------------------------------------------------
    def on_worker(self) -> bool:
        """True on the worker thread itself, or on a calling thread while it runs a step (work running there calls the
        model directly)."""
        if self._stepping_thread == threading.get_ident():
            return True
        worker = self._worker
        return worker is not None and worker.ident == threading.get_ident()

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` on the worker, alone with the model, and return its result (or raise)."""
        if self.on_worker():
            return fn(*args, **kwargs)

        def one_step():
            yield fn(*args, **kwargs)
        request = _Request(one_step(), keep_state=False)
        with self._cond:
            self._add(request)
        try:
            return self.next_item(request)
        finally:
            self.cancel(request)   # a no-op once it ran; drops it if this wait was interrupted (Ctrl-C)

    def open(self, work: Iterator[Any], on_end: Callable[[Any], None] | None = None) -> _Request:
        """A stream request: ``work`` yields items, advanced on the worker one per ``next_item``."""
        request = _Request(work, keep_state=True, on_end=on_end)
        with self._cond:
            self._add(request)
        return request

    def next_item(self, request: _Request) -> Any:
        """The request's next item, computed on the worker; StopIteration at its end or once it is cancelled."""
        if not request.consumer_busy.acquire(blocking=False):
            raise RuntimeError(_BUSY_MESSAGE)
        try:
            if not (getattr(_this_thread, "steps_here", False) and self._step_here(request)):
                with self._cond:   # the worker computes it
                    if request.ended or request.cancelled:
                        raise StopIteration
                    request.demand = True
                    self._ensure_worker()
                    self._cond.notify_all()
            kind, value = request.results.get()
            if kind == _ITEM:
                return value
            if kind == _ERROR:
                raise value
            raise StopIteration
        finally:
            request.consumer_busy.release()

    def _step_here(self, request: _Request) -> bool:
        """Run the request's next step on this thread if the model is free (then its result is in
        ``request.results``); False if the worker has the model (the caller waits for the worker instead)."""
        me = threading.get_ident()
        while True:
            with self._cond:
                if request.ended or request.cancelled:
                    raise StopIteration
                if not (self._worker_busy or self._worker_waits or self._stepping_thread is not None):
                    request.running = True
                    self._stepping_thread = me
                    break
                held_here = self._stepping_thread == me
            # the model is busy (the worker has it, or has work waiting for it, which goes first; or a step runs).
            # A stream of the server's slot driver lets the driver's other streams go on meanwhile: the one that
            # holds the model may be one of them, mid-step on this very thread (a slot's previous request, closed
            # by its client while its pass was pending), so blocking here would wait for ourselves
            parked = driver_greenlet()
            if parked is None:
                if held_here:
                    raise RuntimeError("two streams of one model are advanced on one thread at once; a context "
                                       "runs one generation at a time")
                return False
            parked.wait_for_round()
        try:
            self._step(request)
        finally:
            with self._cond:
                self._stepping_thread = None
                if self._worker_waits:
                    self._cond.notify_all()
        return True

    def cancel(self, request: _Request) -> None:
        """End the request from any thread without waiting: a waiting consumer gets StopIteration now, the worker
        drops the request after the step in progress."""
        with self._cond:
            if request.ended or request.cancelled:
                return
            request.cancelled = True
            if request.demand and not request.running:
                request.demand = False
                request.results.put((_END, None))
            if not request.running and not request.started:
                # it never touched the model: nothing for the worker to do (and no thread to start, which
                # matters when this runs from a finalizer at interpreter exit)
                request.ended = True
                self._requests.remove(request)
            else:
                self._ensure_worker()
            self._cond.notify_all()

    def cancel_all(self) -> None:
        """Cancel every open request (closing the model: open streams end, their next item raises
        StopIteration)."""
        with self._cond:
            open_requests = list(self._requests)
        for request in open_requests:
            self.cancel(request)

    # --- the worker's side ------------------------------------------------------------------------------------
    def _add(self, request: _Request) -> None:
        self._requests.append(request)
        self._ensure_worker()
        self._cond.notify_all()

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name=f"ggml-backend {self._name}", daemon=True)
            self._worker.start()

    def _pick(self) -> tuple[_Request | None, float | None]:
        """(request to step now, or None and how long to wait for one; None: until notified)."""
        live = self._live
        if live is not None and live.demand and not live.cancelled:
            return live, None
        waiting = [r for r in self._requests if r.demand and not r.cancelled]
        if not waiting:
            return None, None
        if live is not None and not live.cancelled and not live.ended:
            # the live stream's consumer is between two items: give it a moment before taking the model away,
            # so two busy streams do not trade the model (and copy their states) at every token
            left = live.idle_since + IDLE_GRACE_S - time.monotonic()
            if left > 0:
                return None, left
        return waiting[0], None

    def _save_state(self):
        return self._save_state_ref()()

    def _load_state(self, state) -> None:
        self._load_state_ref()(state)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # pragma: no cover - a bug here must not leave callers waiting forever
            with self._cond:
                self._worker = None
                for request in self._requests:
                    request.cancelled = True
                    if request.demand or request.running:
                        request.results.put((_ERROR, RuntimeError(f"the model's worker failed: {exc!r}")))
                self._requests.clear()
                self._live = None
            raise

    def _serve(self) -> None:
        while True:
            with self._cond:
                idle_deadline = time.monotonic() + WORKER_LINGER_S
                self._worker_busy = False
                while True:
                    doomed = [r for r in self._requests if r.cancelled and not r.running]
                    request, wait = (None, None) if doomed else self._pick()
                    if (doomed or request is not None) and self._stepping_thread is not None:
                        # a step runs on a calling thread: this work goes next, when it ends
                        self._worker_waits = True
                        self._cond.wait()
                        continue
                    self._worker_waits = False
                    if doomed:
                        break
                    if request is not None:
                        request.running = True
                        request.demand = False
                        break
                    if not self._requests:
                        wait = idle_deadline - time.monotonic()
                        if wait <= 0:
                            self._worker = None   # a caller arriving from now on starts a new worker
                            return
                    self._cond.wait(wait)
                self._worker_busy = True
            if request is None:
                for r in doomed:
                    self._end(r)
            else:
                self._step(request)

    def _step(self, request: _Request) -> None:
        try:
            if request is not self._live:
                self._switch_to(request)
            request.started = True
            result = (_ITEM, next(request.work))
        except StopIteration:
            result = (_END, None)
        except BaseException as exc:   # handed to the consumer, who raises it in its own thread
            result = (_ERROR, exc)
        with self._cond:
            request.running = False
            request.idle_since = time.monotonic()
            if request.cancelled:
                result = (_END, None)
            request.results.put(result)
            # an error ends a stream too: its state may be half-updated, so it must not go on
            if result[0] == _ITEM and request.keep_state:
                return
        self._end(request)

    def _switch_to(self, request: _Request) -> None:
        """Make ``request``'s state the live one, first saving the state of the stream that had the model."""
        live = self._live
        if live is not None and live is not request and live.started and not live.ended:
            # if saving fails (memory), the stream keeps the model and this request gets the error
            live.snapshot = self._save_state()
        self._live = None
        if request.snapshot is not None:
            snapshot, request.snapshot = request.snapshot, None
            self._load_state(snapshot)
        if request.keep_state:
            self._live = request

    def _end(self, request: _Request) -> None:
        """Close the request's work and run its on_end (on this worker thread, with the model to itself)."""
        with self._cond:
            if request.ended:
                return
            request.ended = True
            if request in self._requests:
                self._requests.remove(request)
        snapshot, request.snapshot = request.snapshot, None
        try:
            request.work.close()
            if request.on_end is not None and request.started:
                request.on_end(snapshot)
        except Exception as exc:  # noqa: BLE001 - its consumer is gone; the worker must go on serving the others
            print(f"ggml_backend: error while ending a generation: {exc!r}", file=sys.stderr)
        finally:
            if self._live is request:
                self._live = None


class _ClosedOnExit:
    """``with`` support and a finalizer that close the stream: dropping a stream frees the model."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer must not raise (at interpreter exit threads cannot start)
            pass


class TokenStream(_ClosedOnExit):
    """The iterator ``Llama.generate`` returns: any thread may advance it (one at a time) or close it.

    Closing it (``close()``, leaving a ``with`` block, or dropping the last reference) cancels the generation: the
    model is free for the next request after the step in progress.
    """

    def __init__(self, scheduler: Scheduler, request: _Request, with_logits: bool = False):
        self._scheduler = scheduler
        self._request = request
        self._with_logits = with_logits

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self):
        token, logits = self._scheduler.next_item(self._request)
        return (token, logits) if self._with_logits else token

    def close(self) -> None:
        self._scheduler.cancel(self._request)



class Stream(_ClosedOnExit):
    """Wraps a generator built on a ``TokenStream`` (completion chunks, chat deltas) with the same guarantees:
    any thread may advance it, one at a time (two at once get a ``RuntimeError``), and any thread may close it.

    A generator cannot be closed while another thread runs it, so ``close`` cancels the generation underneath
    first (a thread waiting for its next token gets the end at once) and whichever of the two threads is last to
    leave the generator closes it.
    """

    def __init__(self, generator: Iterator[Any], tokens: "TokenStream | Stream"):
        self._generator = generator
        self._tokens = tokens
        self._busy = threading.Lock()
        self._closed = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(_BUSY_MESSAGE)
        try:
            if self._closed:
                raise StopIteration
            item = next(self._generator)
            if self._closed:            # closed by another thread while this item was being made
                raise StopIteration
            return item
        finally:
            self._busy.release()
            if self._closed:
                self._close_generator()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._tokens.close()
        self._close_generator()   # fails to get _busy if another thread is in __next__: that thread closes it

    def _close_generator(self) -> None:
        if self._busy.acquire(blocking=False):
            try:
                self._generator.close()
            finally:
                self._busy.release()

