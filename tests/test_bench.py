"""``ggml-backend bench`` on the tiny synthetic Llama: every figure is there, from fresh processes, with the RSS cap
computed from the file and the KV cache; crashing measurements are reported, not fatal. No timing assertions."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from ggml_backend import Llama
from ggml_backend.cli import bench
from ggml_backend.cli.bench_models import SHAPES, file_size_estimate, synthetic_model
from ggml_backend.cli.main import main
from refdata import synthetic_file

SMALL = ["--engines", "ggml_backend", "-c", "128", "--prompt-tokens", "16", "--long-prompt-tokens", "48",
         "--gen", "4", "--near-position", "10", "--deep-position", "100"]


@pytest.fixture(scope="module")
def report():
    """One JSON run of the basic figures (6 fresh processes)."""
    model = str(synthetic_file("q4_0"))
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["bench", "-m", model, "--json", *SMALL]) == 0
    return json.loads(out.getvalue())


def test_every_figure_is_a_positive_number(report):
    figures = report["figures"]["ggml_backend"]
    for key in ("open_s", "first_token_s", "prompt_16_tok_s", "prompt_48_tok_s", "decode_tok_s",
                "decode_1_thread_tok_s", "decode_2_threads_over_1", "decode_at_10_tok_s", "decode_at_100_tok_s",
                "deep_over_near", "peak_rss_mb", "kv_cache_mb", "rss_cap_mb"):
        assert isinstance(figures[key], float) and figures[key] > 0, (key, figures[key])
    # -t 2 (the default): the same decode again on one thread, and what the second thread gains
    gain = figures["decode_tok_s"] / figures["decode_1_thread_tok_s"]
    assert figures["decode_2_threads_over_1"] == pytest.approx(gain)
    # first token: a fresh interpreter's start, imports and open, then one token
    assert figures["first_token_s"] > figures["open_s"]
    assert figures["deep_over_near"] == pytest.approx(figures["decode_at_100_tok_s"] / figures["decode_at_10_tok_s"])
    assert report["load_average_before"] is not None and report["machine"]["cores"] >= 1
    assert report["conditions"]["n_ctx"] == 128 and report["conditions"]["repeat"] == 1


def test_kernel_table_beside_memory_bandwidth(report):
    """The report names the kernel paths that ran (decode, prompts) and gives each type's one-core speed beside the
    read bandwidth."""
    from ggml_backend.quant.matmul import KERNEL_ISA, prompt_path
    kernels = report["kernels"]
    assert kernels["kernel_path"] == (KERNEL_ISA.name if KERNEL_ISA is not None else "generic")
    assert kernels["prompt_path"] == prompt_path()
    assert ("GEMM" in prompt_path()) == (KERNEL_ISA is not None)
    assert kernels["read_gbps"] > 0.1
    assert set(kernels["kernels"]) == {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K",
                                       "q6_K", "f16", "bf16", "f32"}
    assert all(gbps > 0 for gbps in kernels["kernels"].values())
    # beside numpy's sum, one core reading by vector loads; with -t 2 each kernel and that read on two threads
    # against one (wall time)
    assert kernels["simd_read_gbps"] > 0.1
    scaling = kernels["thread_scaling"]
    assert scaling["threads"] == 2 and len(scaling["read_gbps"]) == 2 and min(scaling["read_gbps"]) > 0.1
    assert set(scaling["kernels"]) == set(kernels["kernels"])
    assert all(len(pair) == 2 and min(pair) > 0 for pair in scaling["kernels"].values())
    text = bench._text(report)
    assert f"({kernels['kernel_path']} path)" in text and "q6_K" in text
    assert f"prompts on {prompt_path()}" in text
    assert "2 threads against one" in text and "by vector loads" in text
    q6_row = next(line for line in text.splitlines() if line.startswith("q6_K"))
    one, many = scaling["kernels"]["q6_K"]
    assert q6_row.split()[-1] == f"{many / one:.2f}"
    markdown = bench.markdown_report(report)
    assert "| q4_K |" in markdown and f"Prompts on {prompt_path()}." in markdown
    assert "| 2 threads GB/s | x one |" in markdown


def test_rss_cap_is_file_plus_kv_cache_plus_150_mb(report):
    figures = report["figures"]["ggml_backend"]
    model = report["model"]
    # tiny Llama: 4 layers, 8 KV heads of 32 dims; K and V in float16 over n_ctx 128
    kv_bytes = 2 * 4 * 128 * 256 * 2
    assert figures["kv_cache_mb"] * 2 ** 20 == kv_bytes
    assert figures["rss_cap_mb"] == pytest.approx((os.path.getsize(model) + kv_bytes) / 2 ** 20 + 150)
    # llama.cpp's cache is float16 too
    assert report["model_facts"]["kv_cache_bytes"]["llama.cpp"] == kv_bytes
    # the process did hold the numpy/numba runtime and the mapped file
    assert figures["peak_rss_mb"] > os.path.getsize(model) / 2 ** 20


def test_text_report_lists_figures_and_cap(report, capsys):
    bench.print_report(report)
    text = capsys.readouterr().out
    for word in ("first_token_s", "prompt_48_tok_s", "decode_at_100_tok_s", "deep_over_near", "peak_rss_mb",
                 "RSS cap = file + KV cache", "load average"):
        assert word in text


def test_ratio_column_and_errors_in_place_of_figures(report, capsys):
    # a second engine whose processes crashed: its figures say so and the ratio column stays empty there
    crashed = {key: {"error": "crashed (signal 11)"} for key in report["figures"]["ggml_backend"]}
    crashed.update(peak_rss_mb=100.0, kv_cache_mb=1.0, rss_cap_mb=151.0)
    two = dict(report, engines=["ggml_backend", "llama.cpp"],
               figures={"ggml_backend": report["figures"]["ggml_backend"], "llama.cpp": crashed})
    bench.print_report(two)
    lines = capsys.readouterr().out.splitlines()
    decode = next(line for line in lines if line.startswith("decode_tok_s"))
    assert "crashed (signal 11)" in decode and decode.rstrip().endswith("-")
    rss = next(line for line in lines if line.startswith("peak_rss_mb"))
    assert float(rss.split()[-1]) == pytest.approx(report["figures"]["ggml_backend"]["peak_rss_mb"] / 100.0, abs=0.01)


def test_vector_read_reads_every_byte_once_per_chunk():
    """The kernel table's memory read by vector loads (one thread and N) reads each chunk to its last byte."""
    from ggml_backend.cli import bench_kernels
    data = np.zeros(128 * 4 * 8, np.uint8)
    for chunk in range(8):               # a distinct bit at the last byte of each of the 8 chunks (bits 0-7)
        data[(chunk + 1) * 512 - 1] = 1 << chunk
    assert bench_kernels._parallel_read(data, 8) == 0xFF
    assert bench_kernels._parallel_read(data[:4096 - 512], 7) == 0x7F
    one, many = bench_kernels.simd_read_gbps(threads=2, repeats=1, n_bytes=1 << 20)
    assert one > 0 and many > 0
    with pytest.raises(SystemExit):
        bench_kernels.main(["--threads", "0"])


def test_crashing_failing_and_hanging_processes_are_reported():
    crash = bench.run_worker([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], 60)
    assert crash == {"error": "crashed (signal 11)"}
    fail = bench.run_worker([sys.executable, "-c", "import sys; sys.exit('no llama_cpp here')"], 60)
    assert fail == {"error": "failed (exit 1): no llama_cpp here"}
    hang = bench.run_worker([sys.executable, "-c", "import time; time.sleep(60)"], 1)
    assert hang == {"error": "timed out after 1 s"}
    ok = bench.run_worker([sys.executable, "-c", "print('RESULT {\"x\": 2}')"], 60)
    assert ok["x"] == 2 and ok["wall_s"] > 0


def test_medians_and_missing_figures():
    assert bench._median([3.0, 1.0, 2.0]) == 2.0
    assert bench._median([4.0, 1.0, 2.0, 3.0]) == 2.5
    runs = [{"error": "crashed (signal 11)"}, {"decode_tok_s": 5.0}, {"decode_tok_s": 7.0}]
    assert bench._combine(runs, "decode_tok_s") == 6.0
    assert bench._combine(runs[:1], "decode_tok_s") == {"error": "crashed (signal 11)"}


def test_bad_options_raise_value_errors(capsys):
    model = str(synthetic_file("q4_0"))
    assert main(["bench", "-m", model, "--engines", "ggml_backend", "-c", "64"]) == 1
    assert "context holds 64" in capsys.readouterr().err
    assert main(["bench", "-m", model, "--engines", "vllm"]) == 1
    assert "unknown engine" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--scaling-models", "tiny-q4_0,7b-q5_1", "'7b-q5_1' is neither 0.5b"),
    ("--positions", "10,x", "expected whole numbers"),
    ("--positions", "10,5000", "5000 + 64 decode steps do not fit"),
])
def test_scaling_options_are_checked_before_anything_is_measured(monkeypatch, capsys, option, value, message):
    """A typo in the last scaling model or position fails at once, before the basic figures' minutes of work."""
    measured = []
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: measured.append(args) or {"error": "unexpected"})
    assert main(["bench", "-m", str(synthetic_file("q4_0")), "--engines", "ggml_backend", "--scaling", option,
                 value]) == 1
    assert message in capsys.readouterr().err and measured == []


def test_synthetic_model_is_written_once_and_runs(tmp_path):
    path = synthetic_model("tiny", "q8_0", tmp_path)
    assert path.stat().st_size > file_size_estimate(SHAPES["tiny"], "q8_0")
    mtime = path.stat().st_mtime_ns
    assert synthetic_model("tiny", "q8_0", tmp_path) == path and path.stat().st_mtime_ns == mtime
    llm = Llama(str(path), n_ctx=32, verbose=False)
    assert llm.hparams.n_head_kv == 4 and llm.hparams.n_layer == 2 and llm.n_vocab() == 4096
    llm.eval([1, 500, 900])
    logits = llm.scores[2]
    # scales chosen for outputs of standard deviation near 1: finite, neither vanishing nor exploding
    assert np.isfinite(logits).all() and 0.2 < float(logits.std()) < 5


def test_scaling_tables(tmp_path, capsys):
    model = str(synthetic_file("q4_0"))
    args = ["bench", "-m", model, "--json", "--scaling", "--skip-basic", "--scaling-models", "tiny-q4_0",
            "--bench-dir", str(tmp_path), "--positions", "10,60", *SMALL]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert "figures" not in report
    (size_row,) = report["scaling"]["sizes"]
    assert size_row["model"] == "tiny-q4_0" and size_row["n_layer"] == 2 and size_row["n_embd"] == 256
    assert (tmp_path / "synthetic-llama-tiny-q4_0.gguf").is_file()
    figures = size_row["figures"]["ggml_backend"]
    assert figures["prompt_tok_s"] > 0 and figures["decode_tok_s"] > 0
    assert [row["position"] for row in report["scaling"]["positions"]] == [10, 60]
    assert all(row["figures"]["ggml_backend"]["decode_tok_s"] > 0 for row in report["scaling"]["positions"])
    assert math.isclose(size_row["file_mb"], (tmp_path / "synthetic-llama-tiny-q4_0.gguf").stat().st_size / 2 ** 20)


def test_markdown_from_a_saved_report(report, tmp_path, capsys):
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    assert main(["bench", "--from-json", str(saved), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| figure | ggml_backend |" in text and "load average" in text
    row = next(line for line in text.splitlines() if line.startswith("| prompt_48_tok_s |"))
    assert float(row.split("|")[2]) == pytest.approx(report["figures"]["ggml_backend"]["prompt_48_tok_s"], rel=0.01)


def test_a_file_that_is_not_a_saved_report_is_refused(tmp_path, capsys):
    for name, text in (("list.json", "[1, 2]"), ("partial.json", json.dumps({"model": "m", "engines": []}))):
        saved = tmp_path / name
        saved.write_text(text)
        assert main(["bench", "--from-json", str(saved)]) == 1
        err = capsys.readouterr().err
        assert "is not a report saved by 'ggml-backend bench --json'" in err and "machine" in err
        assert "internal error" not in err


def test_other_engines_get_the_users_environment(monkeypatch):
    """Importing ggml_backend sets OMP_WAIT_POLICY=PASSIVE for its own OpenMP fallback; llama.cpp's measuring
    processes must not inherit it (its OpenMP threads then sleep between kernels: decode a third slower)."""
    from ggml_backend import _threading
    monkeypatch.setattr(_threading, "OMP_WAIT_POLICY_SET_HERE", True)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY" not in _threading.environment_for_other_engines()
    monkeypatch.setattr(_threading, "OMP_WAIT_POLICY_SET_HERE", False)   # the user's own setting stays
    assert _threading.environment_for_other_engines()["OMP_WAIT_POLICY"] == "PASSIVE"
    seen = bench.run_worker([sys.executable, "-c", "import os, json; print('RESULT ' + json.dumps("
                             "{'policy': os.environ.get('OMP_WAIT_POLICY')}))"], 60,
                            env={**_threading.environment_for_other_engines(), "OMP_WAIT_POLICY": "ACTIVE"})
    assert seen["policy"] == "ACTIVE"


@pytest.mark.parametrize("type_name", ["q3_K_M", "q4_0"])   # a mix of K-quants and f32 norms; a legacy file
def test_shape_clone_has_the_source_tensors_and_metadata_with_random_weights(tmp_path, type_name):
    """What the offline GPU machine measures instead of a real file (benchmarks/gpu_h200.sh): the header carries
    the metadata and the tensor list; the clone has the same names, types, shapes, metadata and file size, and
    random weights that keep the logits finite and of a sane spread."""
    from ggml_backend.cli.bench_models import write_shape_clone, write_shape_header
    from ggml_backend.formats import load
    source = synthetic_file(type_name)
    header = write_shape_header(source, tmp_path / "header.gguf")
    clone = write_shape_clone(header, tmp_path / "clone.gguf")
    a, b = load(str(source)), load(str(clone))
    assert [(n, t.type.name, tuple(t.shape)) for n, t in a.tensors.items()] == \
        [(n, t.type.name, tuple(t.shape)) for n, t in b.tensors.items()]
    assert set(b.metadata) == set(a.metadata)
    for key, value in a.metadata.items():
        if key != "general.name":
            assert np.array_equal(np.asarray(b.metadata[key]), np.asarray(value)), key
    assert "shape clone" in b.metadata["general.name"]
    assert abs(clone.stat().st_size - source.stat().st_size) <= 64 and header.stat().st_size < source.stat().st_size
    assert any(bytes(np.asarray(t.data)) != bytes(np.asarray(b.tensors[n].data))
               for n, t in a.tensors.items() if len(t.shape) == 2)
    llm = Llama(str(clone), n_ctx=32, verbose=False)
    llm.eval([1, 500, 900])
    logits = llm.scores[2]
    assert np.isfinite(logits).all() and 0.2 < float(logits.std()) < 5
    with pytest.raises(ValueError, match="not a shape header"):
        write_shape_clone(source, tmp_path / "other.gguf")


# ------------------------------------------------------------------------------------------- --paired

def test_turns_alternate_skip_the_first_steps_and_give_the_ratio():
    """take_turns with a clock that each step moves: the order swaps every round, the first ``skip`` steps of a
    turn (here ten times slower, as after the other engine's turn) are left out, and the summary's ratio is ours
    over theirs in speed."""
    from ggml_backend.cli.bench_paired import paired_summary, take_turns
    now, calls = [0.0], []

    def step(name):
        first = not calls or calls[-1][0] != name or calls[-1][1] == 4
        calls.append((name, 1 if first else calls[-1][1] + 1))
        now[0] += (0.01 if name == "ggml_backend" else 0.02) * (10 if first else 1)

    times = take_turns(["ggml_backend", "llama.cpp"], step, rounds=3, block=4, skip=1, clock=lambda: now[0])
    assert [name for name, _ in calls] == (["ggml_backend"] * 4 + ["llama.cpp"] * 8 + ["ggml_backend"] * 8
                                           + ["llama.cpp"] * 4)
    assert [[round(t, 6) for t in turn] for turn in times["ggml_backend"]] == [[0.01] * 3] * 3
    assert [[round(t, 6) for t in turn] for turn in times["llama.cpp"]] == [[0.02] * 3] * 3
    summary = paired_summary(times)
    assert summary["ratio"] == pytest.approx(2.0) and summary["rounds"] == 3
    assert summary["ggml_backend_tok_s"] == pytest.approx(100) and summary["llama.cpp_tok_s"] == pytest.approx(50)
    with pytest.raises(ValueError, match="skip must be in"):
        take_turns(["a", "b"], step, rounds=1, block=2, skip=2)


def test_paired_summary_takes_the_median_of_the_rounds_ratios():
    from ggml_backend.cli.bench_paired import paired_summary
    # rounds at different machine speeds: ratios 1, 2, 3, 4 whatever each round's absolute speed
    times = {"ggml_backend": [[1.0], [0.5], [0.1], [0.2]], "llama.cpp": [[1.0], [1.0], [0.3], [0.8]]}
    summary = paired_summary(times, tokens_per_step=256)
    assert summary["ratio"] == pytest.approx(2.5)
    assert (summary["ratio_q1"], summary["ratio_q3"]) == (pytest.approx(1.5), pytest.approx(3.5))
    assert summary["ggml_backend_tok_s"] == pytest.approx(256 / 0.35)      # the median step over all rounds
    with pytest.raises(ValueError, match="kept steps of both engines"):
        paired_summary({"ggml_backend": [[1.0], []], "llama.cpp": [[1.0], [1.0]]})


def test_paired_needs_both_engines(capsys):
    model = str(synthetic_file("q4_0"))
    assert main(["bench", "-m", model, "--paired", *SMALL]) == 1
    assert "--paired measures ggml_backend beside llama.cpp" in capsys.readouterr().err
    assert main(["bench", "-m", model, "--paired", "--paired-rounds", "20", *SMALL]) == 1
    assert "16 prompt tokens + 160 decode steps" in capsys.readouterr().err


# Stands in for llama-cpp-python where it is not installed (CI): the paired worker drives it as it drives
# llama_cpp.Llama, in the same process as ggml_backend, so the worker's whole path runs.
_STAND_IN = '''
from ggml_backend import Llama as _Ours

class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, verbose, n_batch):
        self._llm = _Ours(model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose, n_batch=n_batch)
        self.eval, self.reset = self._llm.eval, self._llm.reset
'''


def test_paired_figures_from_one_process_per_figure(tmp_path, monkeypatch, capsys):
    """``bench --paired --skip-basic`` end to end with llama.cpp's side played by a stand-in module of
    ggml_backend (the real llama-cpp-python where this machine has it): each figure a positive speed for each
    engine, a ratio inside its quartiles, in the JSON, the text and the Markdown reports."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        (tmp_path / "llama_cpp.py").write_text(_STAND_IN)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path),
                                                                       os.environ.get("PYTHONPATH")])))
    model = str(synthetic_file("q4_0"))
    args = ["bench", "-m", model, "--paired", "--skip-basic", "--no-kernels", "--paired-rounds", "3",
            "--paired-prompt-rounds", "2", *SMALL[2:]]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "figures" not in report and report["conditions"]["paired_rounds"] == 3
    paired = report["paired"]
    assert list(paired) == ["decode_2_threads", "decode_1_thread", "prompt_16", "prompt_48"]
    for name, figure in paired.items():
        assert "error" not in figure, figure
        assert figure["ggml_backend_tok_s"] > 0 and figure["llama.cpp_tok_s"] > 0
        assert figure["ratio_q1"] <= figure["ratio"] <= figure["ratio_q3"]
        assert figure["rounds"] == (3 if name.startswith("decode") else 2)
    assert paired["decode_1_thread"]["threads"] == 1 and paired["decode_2_threads"]["threads"] == 2
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(report))
    assert main(["bench", "--from-json", str(saved)]) == 0
    text = capsys.readouterr().out
    assert "both engines in one process, taking turns" in text and "decode_1_thread" in text
    assert main(["bench", "--from-json", str(saved), "--markdown"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| prompt_48 |"))
    assert float(row.split("|")[4]) == pytest.approx(paired["prompt_48"]["ratio"], abs=0.006)
