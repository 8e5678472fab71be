"""glibc's malloc thresholds (ggml_backend/_allocator.py): once a model is loaded, arrays of a decode step's sizes
reuse freed memory instead of fresh pages; ``GGML_BACKEND_MALLOC=default`` leaves malloc alone. Each case runs in
its own process (the thresholds are process-wide)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from refdata import synthetic_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux")
                                or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                                reason="the thresholds are glibc's")

PROGRAM = """
import resource, numpy as np
from ggml_backend import Llama
from ggml_backend._allocator import reuse_freed_memory
llm = Llama({model!r}, n_ctx=64, verbose=False)
gate = np.ones((16, 4864), np.float32)          # a 16-token step's SiLU input: 311 KB
for _ in range(5):
    np.negative(gate)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    np.negative(gate)                          # a fresh 311 KB array each time, freed at once
print(reuse_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(extra_env: dict) -> tuple[str, int]:
    env = dict(os.environ, **extra_env)
    out = subprocess.run([sys.executable, "-c", PROGRAM.format(model=str(synthetic_file("q4_0")))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flag, faults = out.stdout.split()
    return flag, int(faults)


def test_a_loaded_model_reuses_freed_memory_for_step_sized_arrays():
    flag, faults = _run({"GGML_BACKEND_MALLOC": ""})
    assert flag == "True"
    assert faults < 50 * 76 // 10, faults    # fresh pages would be 76 faults per array


def test_the_user_can_leave_malloc_alone():
    flag, _ = _run({"GGML_BACKEND_MALLOC": "default"})
    assert flag == "False"


# Transparent huge pages off for this process (prctl PR_SET_THP_DISABLE): where the kernel's setting is `always`
# (CI's machine), a fresh 5 MB mapping faults in 2 MB pages, 195 faults instead of 1,280, and the count no longer
# tells a fresh mapping from reused memory.
LARGE_PROGRAM = """
import ctypes
ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)
import resource, threading, numpy as np
from ggml_backend._allocator import large_pass, reuse_freed_memory
reuse_freed_memory()
gate = np.ones((256, 4864), np.float32)         # a 256-token prompt's gate: 5 MB, above the 1 MiB threshold
def faults(n=20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        np.negative(gate)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
outside = faults()
with large_pass():
    faults(2)
    inside = faults()
    done = threading.Event()
    def other():                                 # an overlapping pass on another thread leaves first
        with large_pass():
            pass
        done.set()
    threading.Thread(target=other).start()
    done.wait()
    still = faults()
after = faults()
print(outside, inside, still, after)
"""


def test_a_pass_over_many_tokens_reuses_its_large_arrays_and_gives_them_back():
    out = subprocess.run([sys.executable, "-c", LARGE_PROGRAM], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, GGML_BACKEND_MALLOC=""))
    assert out.returncode == 0, out.stderr[-2000:]
    outside, inside, still, after = map(int, out.stdout.split())
    fresh = 20 * (5 << 20) // 4096 // 4           # a quarter of fresh pages for every array
    assert outside > fresh and after > fresh, (outside, after)     # its own mapping each time, outside a pass
    assert inside < 200 and still < 200, (inside, still)            # reused inside, until the last pass ends
