"""Continuous batching: forward passes of several contexts on one model's weights, combined into one pass.

Decode reads every weight once per forward pass whatever the number of tokens it carries, so N contexts that each
want one token (the server's slots, streaming at once) are served by one pass carrying N tokens for little more
than the price of one. Each context's thread calls ``Model.forward`` as before; here its tokens wait for the pass
in progress to end, and the first of the waiting threads (the leader) runs the next pass for all of them
(flat combining: no thread of our own, nothing to start or stop, and a lone context runs at once).

This is the one mechanism that combines passes: the public ``ContinuousBatcher`` (continuous_batching.py) submits
all its sequences' tokens of a step here at once (``forward_many``), so they share passes with any contexts (the
server's slots) decoding at the same moment.

Results do not depend on batching: a pass stays under BLAS_MIN_TOKENS rows, where the SIMD integer kernels compute
every (weight row, token) pair alone with the one-token code, and everything else in the pass (norms, rope,
attention over each context's own cache) works row by row. So a context gets the numbers it gets alone, bit for
bit; the batcher is used only when that holds (every weight matrix on the SIMD integer kernels).
"""
from __future__ import annotations

import sys
import threading
import time

#: how long a leader waits at most for the other active contexts to join its pass (they are sampling their next
#: token meanwhile and their consumers asking for it, one after another under the GIL: 0.4 ms each on a 2-core
#: Zen 3 at temperature 0, so 6-7 ms for 16 slots; a context that stops generating leaves at once, see
#: ``leave``). 20 ms was too short on a loaded 2-core machine: the contexts' threads missed the pass and each step
#: became two or three passes; a pass of the 0.5B model takes 30-100 ms, so waiting up to 60 ms for a context that
#: does come is cheaper than a pass of its own
GATHER_S = 0.06
#: a context that submitted, or got the result of a pass, within this long counts as active (the leader waits for
#: it to join). Counted from the end of its last pass, not from its submission: a pass of 16 sequences takes longer
#: than this on a 2-core machine, and counted from submission every context of it had expired when it ended, so
#: the first one back ran a pass of its own (server at N = 16: every other step was a pass of 1-12 sequences)
ACTIVE_S = 0.25


class _Job:
    __slots__ = ("tokens", "cache", "every_row", "done", "logits", "error")

    def __init__(self, tokens, cache, every_row=False):
        self.tokens = tokens
        self.cache = cache
        self.every_row = every_row   # the logits after each of its tokens (a speculative verification)
        self.done = False
        self.logits = None
        self.error: BaseException | None = None


class ForwardBatcher:
    """Combines ``Model.forward`` calls of contexts on one model into passes of at most ``max_rows`` tokens."""

    def __init__(self, model, max_rows: int):
        self.model = model
        self.max_rows = max_rows
        # One lock, two conditions, so that a submission wakes only the leader gathering its pass (not every
        # waiting context: 16 slots woke each other 16 times a step, each wake-up taking the GIL) and the end of a
        # pass wakes the contexts waiting for results
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)    # the leader waits here for the active contexts' jobs
        self._finished = threading.Condition(self._lock)   # the others wait here for their jobs / the leader role
        self._pending: list[_Job] = []
        self._leader = False
        self._last_seen: dict[int, float] = {}   # id(cache) -> when it last submitted or got a pass's result
        self.passes = 0                          # statistics: passes run, tokens carried
        self.tokens = 0

    def forward(self, tokens, cache, every_row: bool = False):
        """One context's tokens (fewer than max_rows) through a combined pass: its last token's logits [1, n_vocab],
        or with ``every_row`` the logits after each of its tokens."""
        return self.forward_many([(tokens, cache)], every_row)[0]

    def forward_many(self, items, every_row: bool = False):
        """Several sequences of one caller ([(tokens, cache), ...], each cache once, max_rows tokens at most in
        all) through one combined pass, joined by whatever other callers are waiting: each one's last logits
        (``every_row``: the logits after each of its tokens). The public ``ContinuousBatcher`` submits its whole
        step here, so its sequences and the contexts of ``Llama.new_context`` (the server's slots) share the
        same passes."""
        if sum(len(tokens) for tokens, _cache in items) > self.max_rows:
            raise ValueError(f"a combined pass carries at most {self.max_rows} tokens")
        parked = driver_greenlet()
        if parked is not None:   # the server's slot driver runs this pass with its other slots' (and ours)
            return parked.wait_for_pass("combined", self, items, every_row)
        own = [_Job(tokens, cache, every_row) for tokens, cache in items]
        with self._lock:
            now = time.monotonic()
            for job in own:
                self._pending.append(job)
                self._last_seen[id(job.cache)] = now
            self._arrived.notify()
            while self._leader and not all(j.done for j in own):
                self._finished.wait()
            if all(j.done for j in own):
                return [j.result() for j in own]
            self._leader = True
            batch = self._gather([j for j in own if not j.done])
        try:
            from ..quant.matmul import single_threaded_blas
            # every row's logits when a job wants them (only the rows of jobs of several tokens are extra)
            every_row = any(j.every_row for j in batch)
            with self.model.turns, single_threaded_blas():
                results = self.model.forward_many([(j.tokens, j.cache) for j in batch], every_row)
            for j, logits in zip(batch, results):
                j.logits = logits if j.every_row or not every_row else logits[-1:]
        except BaseException as exc:  # every job of the pass gets it (the pass's caches are in doubt)
            for j in batch:
                j.error = exc
        finally:
            with self._lock:
                now = time.monotonic()
                for j in batch:
                    j.done = True
                    if id(j.cache) in self._last_seen:    # not left meanwhile: it comes back for its next token
                        self._last_seen[id(j.cache)] = now
                self._leader = False
                self.passes += 1
                self.tokens += sum(len(j.tokens) for j in batch)
                self._finished.notify_all()
        # jobs of ours that another leader's pass took finished before ours did (a leader waits for its own)
        with self._lock:
            while not all(j.done for j in own):
                self._finished.wait()
        return [j.result() for j in own]

    def leave(self, cache) -> None:
        """The context of ``cache`` is done for now (its generation ended): passes stop waiting for it."""
        with self._lock:
            self._last_seen.pop(id(cache), None)
            self._arrived.notify()

    def _gather(self, own: list[_Job]) -> list[_Job]:
        """The leader's pass: its own jobs, then waiting jobs first come first served, up to max_rows and one job
        per cache; first a short wait for the other active contexts (called with the lock held)."""
        deadline = time.monotonic() + GATHER_S
        while True:
            now = time.monotonic()
            pending_caches = {id(j.cache) for j in self._pending}
            expected = [c for c, seen in self._last_seen.items() if now - seen < ACTIVE_S and c not in pending_caches]
            rows = sum(len(j.tokens) for j in self._pending)
            if not expected or rows >= self.max_rows or now >= deadline:
                break
            self._arrived.wait(deadline - now)
        # forget contexts gone quiet, but not those whose jobs wait here (pending_caches: the loop's last look,
        # taken under the lock held since): a job submitted early in a pass longer than ACTIVE_S is past the window
        # when this pass gathers, and dropping its cache meant that the end of this pass did not renew it, so the
        # next pass did not wait for it (a loaded 2-core CI machine: passes of 4 alternated with passes of 1-2)
        for c in [c for c, seen in self._last_seen.items() if now - seen >= ACTIVE_S and c not in pending_caches]:
            del self._last_seen[c]
        batch, rows, caches = list(own), sum(len(j.tokens) for j in own), {id(j.cache) for j in own}
        for j in self._pending:
            if j.done or j in own:
                continue
            if id(j.cache) not in caches and rows + len(j.tokens) <= self.max_rows:
                batch.append(j)
                rows += len(j.tokens)
                caches.add(id(j.cache))
        for j in batch:
            self._pending.remove(j)
        return batch


def driver_greenlet():
    """The running greenlet when it is a stream of the server's slot driver (server/slot_driver.py), which gathers
    the passes of all its streams and runs them itself; else None."""
    greenlet = sys.modules.get("greenlet")   # imported by the driver; absent, there is no driver
    if greenlet is None:
        return None
    current = greenlet.getcurrent()
    return current if hasattr(current, "wait_for_pass") else None


def _result(job: _Job):
    if job.error is not None:
        raise job.error
    return job.logits


_Job.result = _result


def batch_invariant(model) -> bool:
    """True when a pass of several contexts gives each the numbers it gets alone: every weight matrix runs on the
    SIMD kernels below BLAS_MIN_TOKENS tokens, the block types' integer kernels or the float types' (float_dot.py:
    one summation order whatever the rows). Without them (CPUs without AVX2) float weights go through sgemm,
    whose summation order may depend on the number of rows."""
    from ..quant.matmul import KERNEL_ISA, KINDS
    if KERNEL_ISA is None:
        return False
    linears = [model.output] + [getattr(layer, name) for layer in model.layers
                                for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    return all(linear.qtype.name in KINDS or linear.qtype.one_token.float_kind is not None for linear in linears)
