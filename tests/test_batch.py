"""``ggml-backend batch`` in one process (no Ray): the line format and its errors, the records, resuming after an
interruption, Parquet in and out, the command line. On the tiny synthetic model (the real-model comparison with
Ray's actors is in test_batch_ray.py)."""
from __future__ import annotations

import json
import os

import pytest

from ggml_backend import Llama
from ggml_backend.batch import done_keys, read_jobs, read_journal, run_local
from ggml_backend.cli.main import main

#: the server's defaults (llama-cpp-python's server), which batch lines get too, where Llama's own differ
SERVER_DEFAULTS = {"repeat_penalty": 1.1, "repeat_last_n": 64}
MODEL = os.path.join(os.path.dirname(__file__), "data", "synthetic", "tiny-llama-q4_0.gguf")

LINES = [
    {"id": 1, "prompt": "Hello", "max_tokens": 6, "temperature": 0},
    {"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
     "stop": ["\n\n"]},
    "not json {",
    {"prompt": "no id"},
    {"id": 1, "prompt": "a second id 1"},
    {"id": 3, "prompt": "x", "maxtokens": 4},
    {"id": 4, "prompt": "x", "temperature": "hot"},
    {"id": 5, "prompt": "x", "messages": []},
    {"id": 6, "prompt": [1, 450, 4096]},
    {"id": 7, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.7, "seed": 42},
]


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
            if line == "not json {":
                f.write("\n")   # a blank line is skipped, yet counts in the line numbers


@pytest.fixture(scope="module")
def llm():
    return Llama(MODEL, n_ctx=512, n_threads=1, verbose=False)


def records_by_id(path):
    return {json.dumps(r["id"]) if r["id"] is not None else f"line {r['line']}": r for r in read_journal(path)}


def test_records_and_bad_lines(tmp_path, llm):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, LINES)
    summary = run_local(str(src), str(out), llm=llm, progress=False)
    assert (summary.total, summary.skipped, summary.written) == (10, 0, 10)
    got = records_by_id(out)
    assert got["1"]["finish_reason"] == "length" and got["1"]["usage"]["completion_tokens"] == 6
    assert got["1"]["text"] == llm("Hello", max_tokens=6, temperature=0, **SERVER_DEFAULTS)["choices"][0]["text"]
    chat = llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stop=["\n\n"],
                                 **SERVER_DEFAULTS)
    assert got['"chat"']["text"] == chat["choices"][0]["message"]["content"]
    assert got['"chat"']["line"] == 2
    # bad lines: an error record each, with the line number (the blank line 4 counts), the rest still ran
    assert got["line 3"]["error"].startswith("line 3: not valid JSON")
    assert got["line 5"]["error"] == "line 5: no 'id'"
    assert got["line 6"]["error"] == "line 6: duplicate id 1 (first on line 1); this line is not run"
    assert got["3"]["error"].startswith("line 7: unknown fields maxtokens")
    assert got["4"]["error"] == 'line 8: \'temperature\' must be a number, got "hot"'
    assert got["5"]["error"] == "line 9: give either 'prompt' or 'messages', not both"
    assert "outside the vocabulary" in got["6"]["error"]
    assert "error" not in got["7"]
    assert summary.errors == 7
    # the seeded sampled line gives the same text again
    again = llm("Once upon a time", max_tokens=4, temperature=0.7, seed=42, **SERVER_DEFAULTS)["choices"][0]["text"]
    assert got["7"]["text"] == again


def test_resume_after_an_interrupted_run(tmp_path, llm):
    src, full, part = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    write_jsonl(src, LINES)
    run_local(str(src), str(full), llm=llm, progress=False)
    complete = full.read_bytes().splitlines(keepends=True)
    # killed while writing the fourth record: three whole lines and half of one
    part.write_bytes(b"".join(complete[:3]) + complete[3][:17])
    summary = run_local(str(src), str(part), llm=llm, progress=False)
    assert (summary.skipped, summary.written) == (3, 7)
    assert sorted(part.read_bytes().splitlines()) == sorted(full.read_bytes().splitlines())
    summary = run_local(str(src), str(part), llm=llm, progress=False)   # nothing left to do
    assert (summary.skipped, summary.written) == (10, 0)
    assert len(done_keys(str(part))) == 10


def test_an_output_that_is_not_ours_is_left_alone(tmp_path, llm):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, LINES[:1])
    out.write_text("some notes\n")
    with pytest.raises(ValueError, match="line 1 is not a record of ggml-backend batch"):
        run_local(str(src), str(out), llm=llm, progress=False)
    assert out.read_text() == "some notes\n"
    with pytest.raises(ValueError, match="must not be the input"):
        run_local(str(src), str(src), llm=llm, progress=False)


def test_parquet_in_and_out(tmp_path, llm):
    pa = pytest.importorskip("pyarrow", reason="Parquet files are read and written with pyarrow")
    import pyarrow.parquet as pq
    src, out, ref = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "ref.jsonl"
    rows = [{"id": "a", "prompt": "Hello", "max_tokens": 5, "temperature": 0.0},
            {"id": "b", "prompt": "Good", "max_tokens": 3, "temperature": 0.0},
            {"id": "c", "prompt": None, "max_tokens": 3, "temperature": 0.0}]   # null prompt: absent
    pq.write_table(pa.Table.from_pylist(rows), src)
    write_jsonl(tmp_path / "in.jsonl", [{k: v for k, v in r.items() if v is not None} for r in rows])
    run_local(str(tmp_path / "in.jsonl"), str(ref), llm=llm, progress=False)
    # a run interrupted after the first record: its journal beside OUT; the rerun finishes and folds it in
    (tmp_path / "out.parquet.partial.jsonl").write_bytes(ref.read_bytes().splitlines(keepends=True)[0])
    summary = run_local(str(src), str(out), llm=llm, progress=False)
    assert (summary.skipped, summary.written) == (1, 2)
    assert not os.path.exists(tmp_path / "out.parquet.partial.jsonl")
    table = pq.read_table(out).to_pylist()
    assert {r["id"]: r["text"] for r in table if r["text"] is not None} == \
        {r["id"]: r["text"] for r in read_journal(str(ref)) if "text" in r}
    assert [r["error"] for r in table if r["id"] == "c"] == ["line 3: give either 'prompt' or 'messages'"]
    assert run_local(str(src), str(out), llm=llm, progress=False).skipped == 3


def test_command_line(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": 1, "prompt": "Hello", "max_tokens": 3, "temperature": 0}, {"prompt": "no id"}])
    assert main(["batch", str(src), str(out), "-m", MODEL, "-t", "1", "-c", "256", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "2 lines, 0 already in" in err and "2 written (1 errors)" in err
    assert [r["line"] for r in read_journal(str(out))] == [1, 2]
    for argv, message in [(["batch", str(tmp_path / "missing.jsonl"), str(out)], "input file not found"),
                          (["batch", str(src), str(out), "--workers", "2"], "--ray-address and --workers need --ray"),
                          (["batch", str(src), str(out), "-m", str(tmp_path / "no.gguf")], "model file not found"),
                          (["batch", str(src), str(out), "-c", "0"], "--ctx-size must be a positive integer")]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_read_jobs_bounds_a_line(tmp_path, monkeypatch):
    import ggml_backend.batch as batch
    monkeypatch.setattr(batch, "MAX_LINE_BYTES", 64)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "x" * 200}) + "\n" + json.dumps({"id": 2, "prompt": "y"}) + "\n"
                   + '"a JSON string"\n' + "[" * 60 + "\n")
    jobs = read_jobs(str(src))
    assert jobs[0].error == "line 1: longer than 64 bytes" and jobs[1].request == {"id": 2, "prompt": "y"}
    assert jobs[2].error == "line 3: expected a JSON object, got str"
    assert jobs[3].error.startswith("line 4: not valid JSON")
    monkeypatch.setattr(batch, "MAX_LINE_BYTES", 10 ** 7)
    src.write_text("[" * 10 ** 6 + "\n")
    assert read_jobs(str(src))[0].error == "line 1: JSON nested too deeply"
