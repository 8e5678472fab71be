"""numba's threading layer for the whole engine, chosen once before the first parallel kernel runs.

numba picks its layer at the first ``parallel=True`` launch; this module is imported by ``ggml_backend.quant``
(which holds every parallel kernel) so the choice below is always in place by then. Why this choice:

* ``tbb`` (the PyPI package ``tbb``): safe when several Python threads call kernels at once (LangChain thread
  pools, several ``Llama`` objects), and its idle workers sleep instead of spinning, so they do not fight
  OpenBLAS's threads or other processes on a small machine. Measured as fast as ``workqueue`` on our kernels.
* ``omp`` with ``OMP_WAIT_POLICY=PASSIVE`` when tbb is missing (numba's ``threadsafe`` request gives tbb, else omp): also thread-safe. Left to spin (the default), its
  workers took the cores away from OpenBLAS and everything else (decode fell to 0.3 GB/s under load).
* never ``workqueue`` by default: it aborts the process when two Python threads launch kernels concurrently.

A user's explicit ``NUMBA_THREADING_LAYER`` (or ``numba.config.THREADING_LAYER`` set before importing us) wins.
"""
from __future__ import annotations

import os


# True when this module put OMP_WAIT_POLICY into the environment (the user had not): child processes that run
# another engine (``ggml-backend bench``'s llama.cpp workers, whose OpenMP threads it slows by a third) must not
# inherit it.
OMP_WAIT_POLICY_SET_HERE = False


def environment_for_other_engines() -> dict:
    """The environment as the user gave it, without what this module added."""
    env = dict(os.environ)
    if OMP_WAIT_POLICY_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def choose_threading_layer() -> str:
    """Ask numba for a thread-safe layer (tbb, else omp) unless the user chose one; return the request."""
    import numba

    explicit = os.environ.get("NUMBA_THREADING_LAYER")
    if explicit:
        return explicit
    if numba.config.THREADING_LAYER not in ("default", ""):
        return numba.config.THREADING_LAYER
    # libgomp reads this when numba loads it at the first parallel launch, which is after this import.
    global OMP_WAIT_POLICY_SET_HERE
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        OMP_WAIT_POLICY_SET_HERE = True
    numba.config.THREADING_LAYER = "threadsafe"   # numba's name for "tbb if installed, else omp"
    return "threadsafe"


THREADING_LAYER = choose_threading_layer()


class TakeTurns:
    """A lock granted in the order it was asked for (first come, first served).

    Contexts that share one model's weights (the server's slots) take turns with it, one forward pass each:
    with ``threading.Lock`` the thread that just released it usually takes it again at once, so one slot would
    decode many tokens while the others wait. A waiter interrupted while waiting (Ctrl-C) leaves the line.
    """

    def __init__(self):
        import collections
        import threading
        self._cond = threading.Condition()
        self._line = collections.deque()
        self._held = False

    def __enter__(self):
        with self._cond:
            if not self._held and not self._line:
                self._held = True
                return self
            me = object()
            self._line.append(me)
            try:
                while self._held or self._line[0] is not me:
                    self._cond.wait()
            except BaseException:
                self._line.remove(me)
                self._cond.notify_all()
                raise
            self._line.popleft()
            self._held = True
            return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()
