"""``ggml-backend batch --ray``: the same lines on Ray Data actors, on a local Ray cluster this module starts and
stops (2 CPUs, one per actor). On the real model, the records of 2 actors are those of one process; a run
resumed after an interruption (Parquet in) finishes the job without running a line twice."""
from __future__ import annotations

import json
import os

import pytest

ray = pytest.importorskip("ray", reason="the batch --ray tests need Ray (pip install 'ggml-backend[ray]')")
pytest.importorskip("ray.data", reason="the batch --ray tests need Ray Data (pip install 'ggml-backend[ray]')")

from ggml_backend.batch import read_journal, run_local  # noqa: E402
from ggml_backend.batch_ray import run_ray  # noqa: E402
from refdata import real_model  # noqa: E402

SYNTHETIC = os.path.join(os.path.dirname(__file__), "data", "synthetic", "tiny-llama-q4_0.gguf")

REAL_LINES = [
    {"id": "rev", "messages": [{"role": "user", "content": "Reverse a string in Python. Code only."}],
     "max_tokens": 12, "temperature": 0},
    {"id": "fib", "prompt": "def fib(n):", "max_tokens": 12, "temperature": 0},
    {"id": "json", "messages": [{"role": "user", "content": "Give a JSON object with a key 'x'."}],
     "max_tokens": 10, "temperature": 0, "response_format": {"type": "json_object"}},
    {"id": "rev", "prompt": "a repeated id"},
    {"id": "sum", "prompt": "# add two numbers\ndef add(a, b):", "max_tokens": 8, "temperature": 0,
     "stop": ["\n\n"]},
]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def by_key(path):
    return {(r["id"], r["line"]): r for r in read_journal(str(path))}


def test_two_actors_give_the_one_process_records_on_the_real_model(tmp_path, cluster):
    model = str(real_model("qwen"))
    src, local, spread = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    write_jsonl(src, REAL_LINES)
    one = run_local(str(src), str(local), model_path=model, n_ctx=512, n_threads=1, progress=False)
    two = run_ray(str(src), str(spread), model_path=model, n_ctx=512, n_threads=1, workers=2, progress=False)
    assert (one.written, two.written, one.errors, two.errors) == (5, 5, 1, 1)
    assert by_key(spread) == by_key(local)
    records = by_key(local)
    assert records[("fib", 2)]["usage"]["completion_tokens"] == 12 and records[("fib", 2)]["text"]
    assert records[(None, 4)]["error"].startswith("line 4: duplicate id \"rev\"")
    assert records[("json", 3)]["text"].lstrip().startswith("{")   # constrained by response_format


def test_resume_on_ray_after_a_partial_output(tmp_path, cluster):
    pa = pytest.importorskip("pyarrow", reason="Ray Data brings pyarrow; the input here is Parquet")
    import pyarrow.parquet as pq
    rows = [{"id": i, "prompt": f"Line {i}", "max_tokens": 4, "temperature": 0.0} for i in range(6)]
    src, ref, out = tmp_path / "in.parquet", tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    pq.write_table(pa.Table.from_pylist(rows), src)
    run_local(str(src), str(ref), model_path=SYNTHETIC, n_ctx=256, n_threads=1, progress=False)
    done = ref.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(done[:2]) + done[2][:11])   # interrupted while writing the third record
    summary = run_ray(str(src), str(out), model_path=SYNTHETIC, n_ctx=256, n_threads=1, workers=1, progress=False)
    assert (summary.skipped, summary.written, summary.errors) == (2, 4, 0)
    lines = out.read_bytes().splitlines()
    assert len(lines) == 6 and sorted(lines) == sorted(ref.read_bytes().splitlines())
