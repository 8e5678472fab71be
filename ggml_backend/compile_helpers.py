"""Helper processes that compile a model's kernels beside the process that opened it, on its first run on a CPU.

numba compiles each kernel the first time a process needs it and caches it on disk; a fresh install waits about 70
seconds before the first token of the default model on one core, because numba compiles on one core, one kernel at
a time (a compile holds the GIL and numba's compile lock, so threads would not help). The kernels of the three
kinds of forward pass are mostly distinct: one-token passes (the decode step: ``matvec``, ``decode_layer``),
prompts of a few tokens (``matmul_few``'s tiles) and long prompts (the GEMM). So when a ``Llama`` opens a model
whose kernels this CPU has not compiled yet, it starts helper processes, one per kind of pass (as many as there
are cores to spare, decode first): each opens the same file (mapped: the page cache is shared) and runs one such
pass on a small context, so its kernels land in numba's cache while the opening process compiles what its own
first prompt needs. When the opening process gets to a kernel a helper has saved, numba loads it instead of
compiling it. Measured on 2 cores (Xeon, Qwen2.5-Coder-0.5B, an 18-token chat prompt then decoding, empty cache):
the first decoded token after 44 s instead of 73.

A helper that finishes leaves a marker file beside the kernels it compiled (``ahead-<key>-<task>.done`` in numba's
cache folder of ``model/decode_step.py``), so later opens start none for that kind of pass (a kind no helper took
yet, where there were fewer helpers than kinds, goes to a helper of a later open); the key covers what the kernels
depend on (the kernel sources' file stamps, numba's version, the CPU and kernel path, the model's tensor
types and shapes, the KV cache types). A helper holds a lock file beside its marker while it runs, so processes
opening the same model at once (server replicas) start one helper per kind of pass between them. It runs at a lower
priority, and ends at most ten seconds after the process that started it (time to finish where it only loads cached
kernels and leave its marker). ``GGML_BACKEND_COMPILE_HELPERS``: ``0`` starts none, ``N`` at most N (default: one
per core past the first, at most three; none without 1 GiB of memory available per helper).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ENV = "GGML_BACKEND_COMPILE_HELPERS"
#: set in a helper's environment: its own ``Llama`` starts no helpers
HELPER_ENV = "GGML_BACKEND_IS_COMPILE_HELPER"
#: each helper's pass, most wanted first: the opening process itself starts with a prompt (a few tokens or a long
#: one), and decodes after it
TASKS = ("decode", "prompt", "few")
MAX_HELPERS = 3
MEMORY_PER_HELPER = 1 << 30
#: the helper's context: enough for the longest pass (a prompt past the length that takes the prompt path)
HELPER_N_CTX = 128
#: how long a helper goes on after the process that started it has ended
ORPHAN_GRACE_S = 10.0
_started: dict[str, list] = {}     # key -> helper processes started by this process
_lock = threading.Lock()


def helper_limit() -> int:
    """How many helpers ``GGML_BACKEND_COMPILE_HELPERS`` allows (unset: one per core past the first, at most
    ``MAX_HELPERS``); ValueError naming the variable when it is not a non-negative integer."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return max(0, min(MAX_HELPERS, (_usable_cores() or 1) - 1))
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"{ENV} must be a number of helper processes (0 to start none), got {value!r}")
    return limit


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def kernel_key(model, cache_types: tuple[str, str], n_threads: int = 1) -> str:
    """What this model's kernels on this CPU depend on, as a digest: equal keys compile the same kernels (the
    thread count is an argument of the kernels, not part of their types, but one token on one thread and on
    several run different code: ``decode_step.one_token_code``)."""
    import llvmlite.binding as llvm
    import numba

    from . import _numba_cache
    from .model.decode_step import one_token_code
    from .quant.matmul import KERNEL_ISA
    digest = hashlib.sha256()

    def add(*parts) -> None:
        digest.update(repr(parts).encode())

    # the sources' stamps, as numba's own index compares them: an edit changes them, and drop_stale_kernels removes
    # the markers with the kernels when the sources' text changes, so their text need not be read again here
    add(_numba_cache.kernel_sources_digest(stamps=True))
    add(numba.__version__, sys.version_info[:2], getattr(KERNEL_ISA, "name", None))
    add(*(os.environ.get(name) for name in ("GGML_BACKEND_KERNELS", "GGML_BACKEND_RELAYOUT", "NUMBA_CPU_NAME",
                                            "NUMBA_CPU_FEATURES", "NUMBA_OPT", "NUMBA_THREADING_LAYER")))
    add(llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())
    add(model.hp.arch.name, tuple(cache_types), one_token_code(n_threads))
    add(sorted((name, getattr(tensor.type, "name", str(tensor.type)), tuple(tensor.shape))
               for name, tensor in model.file.tensors.items()))
    return digest.hexdigest()[:24]


def _marker_folder() -> Path | None:
    """numba's cache folder of the decode step's kernels (the package's __pycache__, or under NUMBA_CACHE_DIR),
    where the markers live beside the kernels; None where numba keeps no cache."""
    from .model import decode_step
    cache = getattr(decode_step.decode_layer, "_cache", None)
    path = getattr(cache, "_cache_path", None)
    return Path(path) if path else None


def marker_path(folder: Path, key: str, task: str) -> Path:
    return folder / f"ahead-{key}-{task}.done"


def _take_lock(marker: Path) -> int | None:
    """An open descriptor holding the task's lock file (beside its marker), or None when another process holds it.
    Where there is no ``fcntl`` (Windows) every caller gets one."""
    fd = os.open(marker.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def start_helpers(model, model_path: str, n_threads: int, cache_types: tuple[str, str]) -> list:
    """Start the helpers this model's kernels still want (see the module's docstring); their processes, or []."""
    if os.environ.get(HELPER_ENV) or not sys.executable:
        return []
    limit = helper_limit()
    if limit == 0:
        return []
    folder = _marker_folder()
    if folder is None:
        return []
    try:
        key = kernel_key(model, cache_types, n_threads)
    except OSError:    # a kernel source unreadable: nothing to key the markers on
        return []
    with _lock:
        if key in _started:
            return []
        _started[key] = []
        wanted = [task for task in TASKS if not marker_path(folder, key, task).exists()]
        if not wanted:
            return []
        from ._allocator import available_memory
        available = available_memory()
        if available is not None:
            limit = min(limit, available // MEMORY_PER_HELPER)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return []
        if not os.access(folder, os.W_OK):
            return []
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, **{HELPER_ENV: "1", ENV: "0"})
        for task in wanted:
            if len(_started[key]) >= limit:
                break
            marker = marker_path(folder, key, task)
            try:
                fd = _take_lock(marker)
            except OSError:
                break
            if fd is None:       # another process's helper is on it
                continue
            os.close(fd)         # the helper takes the lock itself; if another takes it first, this one leaves
            command = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                       "from ggml_backend.compile_helpers import main; main(sys.argv[2:])", package_root,
                       "--task", task, "--marker", str(marker), "--parent", str(os.getpid()),
                       "--n-threads", str(n_threads), "--type-k", cache_types[0], "--type-v", cache_types[1],
                       model_path]
            try:
                process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
            except OSError:
                break
            _started[key].append(process)
            # reaped when it ends, so a long-lived process (a server) keeps no zombie
            threading.Thread(target=process.wait, daemon=True, name="ggml_backend compile helper").start()
        return list(_started[key])


def _run_task(llm, task: str) -> None:
    n_vocab = llm.n_vocab()

    def ids(n: int) -> list[int]:
        return [(100 + 37 * i) % n_vocab for i in range(n)]

    from .model.session import runs_alone
    if task == "decode":
        llm.eval(ids(1))
        llm.eval(ids(1))
    elif task == "prompt":     # a batch past the first length that takes the prompt path (runs alone)
        first = next((n for n in range(2, HELPER_N_CTX) if runs_alone(n)), HELPER_N_CTX - 16)
        llm.eval(ids(min(first + 16, HELPER_N_CTX)))
    elif task == "few":
        llm.eval(ids(8))
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _watch_parent(parent: int) -> None:
    """End this helper ``ORPHAN_GRACE_S`` after the process that started it has ended (it is then re-parented):
    long enough to finish where the kernels were cached already (loading them takes a second or two, and leaves
    the marker that spares later runs a helper), not long enough to go on compiling for a process that is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(0)


def main(argv=None) -> int:
    """A helper's process: open the model, run its task's pass, leave the marker. Exits 0 on success."""
    import argparse
    parser = argparse.ArgumentParser(prog="ggml_backend.compile_helpers")
    parser.add_argument("model")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--n-threads", type=int, default=1)
    parser.add_argument("--type-k", default="f16")
    parser.add_argument("--type-v", default="f16")
    args = parser.parse_args(argv)
    os.environ[HELPER_ENV] = "1"
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    marker = Path(args.marker)
    lock = _take_lock(marker)
    if lock is None or marker.exists():
        return 0        # another helper has this task, or has done it
    try:
        os.nice(5)
    except (AttributeError, OSError):
        pass
    from .api import Llama
    llm = Llama(args.model, n_ctx=HELPER_N_CTX, n_threads=args.n_threads, type_k=args.type_k, type_v=args.type_v,
                verbose=False)
    _run_task(llm, args.task)
    llm.close()
    temporary = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{args.model}\n")
    os.replace(temporary, marker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
