"""The mechanism behind the 13B benchmark (benchmarks/large_ggml_13b.py), at CI size: the GGML writer streams a
~200 MB q4_0 file without holding it in memory, and ``Llama`` maps it instead of reading it (RSS right after load
far below the file size). Each half runs in a fresh interpreter so its RSS figures are its own."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ggml_backend.cli.bench_models import LlamaShape, file_size_estimate

# 7 layers of LLaMA-1B width, multi-head (GGML files predate grouped-query attention): about 214 MB in q4_0.
SHAPE = LlamaShape("ci", n_embd=2048, n_layer=7, n_ff=5632, n_head=16, n_head_kv=16, n_vocab=4096)
MB = 2 ** 20

_RSS = '''
import json, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
# VmHWM, not ru_maxrss: a child started by vfork/exec inherits its parent's ru_maxrss
def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
'''

_WRITE = _RSS + '''
from ggml_backend.cli.bench_models import LlamaShape, write_synthetic_ggml
before = rss()
write_synthetic_ggml(sys.argv[1], LlamaShape(**json.loads(sys.argv[2])), "q4_0")
print(json.dumps({"before": before, "peak": peak_rss()}))
'''

_LOAD = _RSS + '''
import numpy as np
from ggml_backend import Llama
before = rss()
llm = Llama(sys.argv[1], n_ctx=16, verbose=False, rms_norm_eps=1e-5)
after_load = rss()
llm.eval([1, 300, 2000])
print(json.dumps({"before": before, "after_load": after_load, "kv": llm.cache.nbytes,
                  "finite": bool(np.isfinite(llm.scores[2]).all()), "n_layer": llm.hparams.n_layer}))
'''


def _run(script: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "ci-q4_0.ggmlv3.bin"
    written = _run(_WRITE, str(path), json.dumps(vars(SHAPE)))
    yield path, written
    path.unlink(missing_ok=True)     # pytest keeps recent temp dirs; 200 MB each is too much to leave


def test_writer_streams_a_200_mb_file_in_little_memory(big_file):
    path, written = big_file
    size = path.stat().st_size
    assert size >= 200 * MB and size >= file_size_estimate(SHAPE, "q4_0")
    growth = written["peak"] - written["before"]
    assert growth < 50 * MB, f"writing {size / MB:.0f} MB grew the writer by {growth / MB:.0f} MB"


def test_llama_maps_the_file_instead_of_reading_it(big_file):
    path, _ = big_file
    size = path.stat().st_size
    loaded = _run(_LOAD, str(path))
    assert loaded["n_layer"] == SHAPE.n_layer and loaded["finite"]
    growth = loaded["after_load"] - loaded["before"]
    # the KV cache and tokenizer are allocated; the 214 MB of weights are only mapped
    assert growth < loaded["kv"] + 0.25 * size, f"RSS grew by {growth / MB:.0f} MB on opening {size / MB:.0f} MB"
