"""Helper processes that compile a model's kernels on its first run on a CPU (ggml_backend/compile_helpers.py):
how many start, what keys their markers, and, end to end in processes with an empty numba cache of their own, that
a helper's kernels are what another process's decode step then loads without compiling, and that a helper ends
soon after the process that started it (which it outlives by a short grace only)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggml_backend import compile_helpers
from ggml_backend.compile_helpers import ENV, helper_limit, kernel_key

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_helper_limit_reads_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert helper_limit() == 0
    monkeypatch.setenv(ENV, "2")
    assert helper_limit() == 2
    monkeypatch.delenv(ENV)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert helper_limit() == max(0, min(compile_helpers.MAX_HELPERS, cores - 1))
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(ValueError, match=ENV):
            helper_limit()


def test_a_bad_setting_is_a_clear_error_when_a_model_opens(monkeypatch, tiny_path):
    from ggml_backend import Llama
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ValueError, match=f"{ENV} must be a number"):
        Llama(str(tiny_path), n_ctx=64, verbose=False)


def test_the_key_follows_what_the_kernels_depend_on(tiny_path):
    from ggml_backend import Llama
    llm = Llama(str(tiny_path), n_ctx=64, n_threads=1, verbose=False)
    other = Llama(str(Path(tiny_path).with_name("tiny-llama-q2_K.gguf")), n_ctx=64, n_threads=1, verbose=False)
    key = kernel_key(llm.model, ("f16", "f16"))
    assert key == kernel_key(llm.model, ("f16", "f16"))
    assert key != kernel_key(llm.model, ("q8_0", "f16"))
    assert key != kernel_key(other.model, ("f16", "f16"))
    # one token on several threads runs each layer in one launch (other kernels); 2 or 8 threads, the same ones
    assert kernel_key(llm.model, ("f16", "f16"), 2) == kernel_key(llm.model, ("f16", "f16"), 8) != key
    assert llm._compile_helpers == []       # GGML_BACKEND_COMPILE_HELPERS=0 (conftest): none started
    llm.close()
    other.close()


# Run in a fresh interpreter whose numba cache (NUMBA_CACHE_DIR) is empty: open the model; then either wait for the
# helpers it started ("wait"), evaluate one token and report the decode step's cache hits and misses ("decode"), or
# leave at once ("leave"). Prints one JSON line.
_SCRIPT = r'''
import json, os, sys
from ggml_backend import Llama
from ggml_backend.model import decode_step
mode, model = sys.argv[1], sys.argv[2]
llm = Llama(model, n_ctx=128, n_threads=1, verbose=True)
helpers = llm._compile_helpers
result = {"helpers": [p.pid for p in helpers]}
if mode == "wait":
    result["returncodes"] = [p.wait(timeout=900) for p in helpers]
elif mode == "decode":
    llm.eval([1])
    result["hits"] = sum(decode_step.decode_layer._cache_hits.values())
    result["misses"] = sum(decode_step.decode_layer._cache_misses.values())
    result["returncodes"] = [p.wait(timeout=900) for p in helpers]
print(json.dumps(result), flush=True)
if mode == "leave":
    os._exit(0)
'''


def _run(mode: str, model: Path, cache_dir: Path, helpers: str = "1") -> tuple[dict, str]:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **{ENV: helpers})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(model)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_helper_compiles_the_decode_step_that_another_process_then_loads(tmp_path, tiny_path):
    cache_dir = tmp_path / "numba-cache"
    first, stderr = _run("wait", tiny_path, cache_dir)
    assert len(first["helpers"]) == 1 and first["returncodes"] == [0]     # one helper allowed: the decode pass
    assert "1 helper process(es)" in stderr
    markers = list(cache_dir.rglob("ahead-*-decode.done"))
    assert len(markers) == 1
    # the next process finds its decode step's kernels in the cache, and its one helper takes the next kind of
    # pass (a long prompt), not the decode step again
    second, _ = _run("decode", tiny_path, cache_dir)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert len(second["helpers"]) == 1 and second["returncodes"] == [0]
    assert sorted(path.name.rsplit("-", 1)[1] for path in cache_dir.rglob("ahead-*.done")) == [
        "decode.done", "prompt.done"]


def test_a_helper_ends_with_the_process_that_started_it(tmp_path, tiny_path):
    result, _ = _run("leave", tiny_path, tmp_path / "numba-cache")
    (pid,) = result["helpers"]
    deadline = time.monotonic() + compile_helpers.ORPHAN_GRACE_S + 50     # its grace, and its start
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.2)
    pytest.fail(f"helper {pid} still runs a minute after the process that started it ended")


def test_a_task_whose_lock_another_process_holds_is_left_to_it(tmp_path, monkeypatch, tiny_path):
    from ggml_backend import Llama
    marker = compile_helpers.marker_path(tmp_path, "k", "decode")
    held = compile_helpers._take_lock(marker)
    assert held is not None
    assert compile_helpers._take_lock(marker) is None        # a second holder is refused (flock: per open file)
    os.close(held)
    again = compile_helpers._take_lock(marker)
    assert again is not None
    os.close(again)

    llm = Llama(str(tiny_path), n_ctx=64, n_threads=1, verbose=False)
    monkeypatch.setattr(compile_helpers, "_marker_folder", lambda: tmp_path)
    monkeypatch.setattr(compile_helpers, "_started", {})
    monkeypatch.setenv(ENV, "1")
    key = kernel_key(llm.model, ("f16", "f16"))
    held = compile_helpers._take_lock(compile_helpers.marker_path(tmp_path, key, "decode"))   # another's helper
    try:
        (process,) = compile_helpers.start_helpers(llm.model, str(tiny_path), 1, ("f16", "f16"))
    finally:
        os.close(held)
    try:
        task = process.args[process.args.index("--task") + 1]
        assert task == "prompt"                                   # the next kind of pass, not the held one
        assert compile_helpers.start_helpers(llm.model, str(tiny_path), 1, ("f16", "f16")) == []   # once a key
    finally:
        process.kill()
        process.wait(30)
    llm.close()
