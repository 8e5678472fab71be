"""The model's scheduler on a stand-in model (a counter for state): preemption with saved state, cancellation from
other threads, errors, the worker's lifetime. Fast; the real model's streams are in test_api.py. Every wait is
bounded, so a deadlock fails a test instead of hanging the suite."""
from __future__ import annotations

import threading
import time

import pytest

from ggml_backend.model import scheduler as sched
from ggml_backend.model.scheduler import Scheduler, Stream, TokenStream


class Counter:
    """A 'model' whose whole state is a list; each step of a stream appends to it and yields what it holds."""

    def __init__(self):
        self.state: list = []
        self.saves = 0
        self.loads = 0
        self.scheduler = Scheduler(self.save_state, self.load_state, name="counter")

    def save_state(self):
        self.saves += 1
        return list(self.state)

    def load_state(self, state):
        self.loads += 1
        self.state = list(state)

    def stream(self, tag, n, on_end=None):
        def work():
            self.state = []          # a new request starts from scratch, as a prompt evaluation does
            for i in range(n):
                self.state.append(f"{tag}{i}")
                yield (tuple(self.state), None)
        return TokenStream(self.scheduler, self.scheduler.open(work(), on_end=on_end))


def in_thread(fn, timeout=10):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test's thread
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s: a deadlock"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_an_idle_stream_is_preempted_and_its_state_restored():
    model = Counter()
    a = model.stream("a", 4)
    assert next(a) == ("a0",) and next(a) == ("a0", "a1")
    # another request while a's consumer is idle: after the grace period a's state is saved, then restored
    assert in_thread(lambda: list(model.stream("b", 2))) == [("b0",), ("b0", "b1")]
    assert list(a) == [("a0", "a1", "a2"), ("a0", "a1", "a2", "a3")]
    assert model.saves == 1 and model.loads == 1


def test_a_busy_stream_keeps_the_model_until_it_ends():
    model = Counter()
    a = model.stream("a", 30)
    next(a)
    others = []
    waiter = threading.Thread(target=lambda: others.append(model.scheduler.call(lambda: list(model.state))),
                              daemon=True)
    waiter.start()
    for _ in a:   # asked for at once, again and again: no preemption (no state copies) in between
        pass
    waiter.join(10)
    assert others == [[f"a{i}" for i in range(30)]] and model.saves == 0


def test_cancel_from_another_thread_wakes_the_waiting_consumer():
    model = Counter()
    hold = threading.Event()
    blocker = threading.Thread(target=model.scheduler.call, args=(hold.wait, 10), daemon=True)
    blocker.start()
    time.sleep(0.05)
    stream = model.stream("a", 5)
    got = []
    consumer = threading.Thread(target=lambda: got.append(list(stream)), daemon=True)
    consumer.start()
    time.sleep(0.1)
    in_thread(stream.close)                 # the consumer waits for a step that never ran: it ends now
    consumer.join(5)
    assert not consumer.is_alive() and got == [[]]
    hold.set()
    blocker.join(5)
    assert in_thread(lambda: model.scheduler.call(lambda: "free")) == "free"


def test_on_end_runs_once_with_the_snapshot_of_a_preempted_stream():
    model = Counter()
    ended = []
    a = model.stream("a", 5, on_end=ended.append)
    next(a)
    next(a)
    in_thread(lambda: list(model.stream("b", 1)))   # a is preempted: its state lives in a snapshot
    a.close()
    deadline = time.monotonic() + 5
    while not ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ended == [["a0", "a1"]]
    b_ended = []
    b = model.stream("b", 2, on_end=b_ended.append)
    list(b)
    deadline = time.monotonic() + 5
    while not b_ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b_ended == [None]                         # ended while live: the live state is its own
    never = model.stream("c", 2, on_end=b_ended.append)
    never.close()                                    # never ran: nothing to save
    time.sleep(0.1)
    assert b_ended == [None]


def test_an_error_in_a_step_reaches_the_consumer_and_ends_the_stream():
    model = Counter()

    def work():
        yield (1, None)
        raise ValueError("bad step")
    stream = TokenStream(model.scheduler, model.scheduler.open(work()))
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad step"):
        next(stream)
    assert list(stream) == []
    with pytest.raises(KeyError):
        model.scheduler.call(lambda: {}["missing"])


def test_a_wrapped_stream_closed_mid_item_by_another_thread():
    model = Counter()
    tokens = model.stream("a", 100)
    release = threading.Event()

    def chunks():
        for token in tokens:
            release.wait(5)
            yield token
    stream = Stream(chunks(), tokens)
    consumer_result = []
    consumer = threading.Thread(target=lambda: consumer_result.append(next(stream, "ended")), daemon=True)
    consumer.start()
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="already being iterated in another thread"):
        next(stream)
    in_thread(stream.close)          # cannot close the generator while it runs: the consumer closes it on exit
    release.set()
    consumer.join(5)
    assert consumer_result == ["ended"] and list(stream) == []


def test_the_worker_ends_when_idle_and_a_new_one_starts(monkeypatch):
    monkeypatch.setattr(sched, "WORKER_LINGER_S", 0.05)
    model = Counter()
    assert model.scheduler.call(lambda: threading.current_thread().name) == "ggml-backend counter"
    deadline = time.monotonic() + 5
    while model.scheduler._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.scheduler._worker is None
    assert model.scheduler.call(lambda: 42) == 42


def test_inside_steps_on_this_thread_a_stream_steps_on_the_calling_thread():
    model = Counter()
    where = []

    def work():
        model.state = []
        for i in range(3):
            where.append(threading.get_ident())
            model.state.append(i)
            yield (tuple(model.state), None)

    def consume():
        with sched.steps_on_this_thread():
            stream = TokenStream(model.scheduler, model.scheduler.open(work()))
            return list(stream), threading.get_ident()
    items, consumer = in_thread(consume)
    assert items == [(0,), (0, 1), (0, 1, 2)]
    assert where == [consumer] * 3
    # outside the block, the same stream steps on the model's worker
    where.clear()
    assert list(TokenStream(model.scheduler, model.scheduler.open(work()))) == items
    assert set(where) and threading.get_ident() not in where and consumer not in where


def test_a_step_on_the_calling_thread_and_the_worker_never_overlap():
    model = Counter()
    # the worker is busy: a step asked for on a calling thread waits for it, then runs
    hold = threading.Event()
    blocker = threading.Thread(target=model.scheduler.call, args=(hold.wait, 10), daemon=True)
    blocker.start()
    time.sleep(0.05)
    got = []

    def consume():
        with sched.steps_on_this_thread():
            got.append(next(model.stream("a", 2)))
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    time.sleep(0.1)
    assert not got, "a step ran while the worker had the model"
    hold.set()
    consumer.join(5)
    assert got == [("a0",)]
    # a step runs on a calling thread: work for the worker waits until it ends
    in_step, release = threading.Event(), threading.Event()

    def slow_work():
        in_step.set()
        release.wait(10)
        yield (("slow",), None)
    stream = TokenStream(model.scheduler, model.scheduler.open(slow_work()))
    items = []

    def consume_slow():
        with sched.steps_on_this_thread():
            items.append(next(stream))
    consumer = threading.Thread(target=consume_slow, daemon=True)
    consumer.start()
    assert in_step.wait(5)
    answered = []
    caller = threading.Thread(target=lambda: answered.append(model.scheduler.call(lambda: "worker ran")),
                              daemon=True)
    caller.start()
    time.sleep(0.1)
    assert not answered, "the worker ran while a step had the model on another thread"
    release.set()
    consumer.join(5)
    caller.join(5)
    assert items == [("slow",)] and answered == ["worker ran"]
    stream.close()


def test_a_driver_stream_waits_in_turns_for_a_step_that_another_of_its_streams_holds():
    """The server's slot driver runs many streams on one thread, switching between them inside their steps (a
    greenlet parks where it needs a forward pass). A slot's next request may start while the previous one, closed
    by its client, is still mid-step on the same model: the new stream must let the driver go on (and finish that
    step), not wait for the worker (which would wait for this very thread) nor fail."""
    greenlet = pytest.importorskip("greenlet", reason="the server extra (greenlet) is not installed")
    model = Counter()
    rounds = []

    class DriverStream(greenlet.greenlet):
        def wait_for_pass(self, kind, runner, items, every_row):
            return self.parent.switch(kind)

        def wait_for_round(self):
            rounds.append(1)
            self.wait_for_pass("wait", None, [], False)

    def parking_work():
        model.state = ["first"]
        greenlet.getcurrent().wait_for_pass("alone", None, [], False)   # mid-step: its pass is pending
        yield (tuple(model.state), None)
    first = TokenStream(model.scheduler, model.scheduler.open(parking_work()))
    second = model.stream("b", 2)

    def drive():
        with sched.steps_on_this_thread():
            a = DriverStream(lambda: list(first))
            b = DriverStream(lambda: list(second))
            assert a.switch() == "alone"         # the first stream parks inside its step
            first.close()                        # its client leaves meanwhile
            assert b.switch() == "wait"          # the second waits for its turn instead of failing
            assert a.switch() == [] and a.dead   # the pass done, its step ends; closed, it yields nothing more
            return b.switch()                    # now the second runs
    assert in_thread(drive) == [("b0",), ("b0", "b1")]
    assert rounds == [1]
