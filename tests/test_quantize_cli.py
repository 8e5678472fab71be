"""``ggml-backend quantize`` and ``quantize_model``: llama.cpp's per-tensor types and bytes, files our engine runs,
GGML output, errors that cost nothing, and memory that does not grow with the model.

The references are llama.cpp's own quantizations (llama-cpp-python 0.3.36) of three small source models that
``quantize_sources`` writes deterministically; ``tests/data/quantize_mix.json`` keeps their tensor types and
sha256 sums (remade by ``tests/make_quantize_mix.py``).
"""
from __future__ import annotations

import errno
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ggml_backend
from ggml_backend.cli.main import main
from ggml_backend.formats import load, write_gguf
from ggml_backend.tools.quant_mix import FILE_TYPES, parse_file_type, plan_tensor_types
from ggml_backend.tools.quantize import quantize_model
from quantize_sources import SOURCES, sha256_file, tensor_digests, write_source
from refdata import real_model

DATA = Path(__file__).parent / "data"
MIX = json.loads((DATA / "quantize_mix.json").read_text())
CASES = list(MIX["outputs"])
REPO = Path(__file__).resolve().parent.parent


def parse_case(key: str):
    match = re.fullmatch(r"(\w)/(\w+)(?:\[(.*)\])?", key)
    options = {}
    for item in filter(None, (match.group(3) or "").split(",")):
        name, value = item.split("=")
        options[name] = True if value == "True" else value
    return match.group(1), match.group(2), options


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The three source models, written once; their bytes must be the ones llama.cpp quantized."""
    directory = tmp_path_factory.mktemp("quantize-sources")
    paths = {}
    for name in SOURCES:
        paths[name] = write_source(name, directory / f"{name}.gguf")
        assert sha256_file(paths[name]) == MIX["sources"][name]["sha256"], (
            f"source model {name} changed; if on purpose, remake the reference: python tests/make_quantize_mix.py")
    return paths


# ------------------------------------------------------------------------------------- llama.cpp's choices

@pytest.mark.parametrize("case", CASES)
def test_tensor_types_and_order_match_llama_cpp(sources, case):
    source, file_type, options = parse_case(case)
    model = load(sources[source])
    plan = plan_tensor_types(model.tensors.values(), file_type, model.metadata, **options)
    ours = [[p.name, p.target_type.name, list(reversed(p.shape))] for p in plan]
    assert ours == [t[:3] for t in MIX["outputs"][case]["tensors"]]


def test_the_mixes_differ_where_llama_cpp_says():
    """A few of the rules, spelled out on the reference data itself (so a wrong JSON cannot pass silently)."""
    def types(case):
        return {t[0]: t[1] for t in MIX["outputs"][case]["tensors"]}
    a_q4km, a_q2k, b_q4_0 = types("a/Q4_K_M"), types("a/Q2_K"), types("b/Q4_0")
    assert a_q4km["output.weight"] == "q6_K" and a_q4km["token_embd.weight"] == "q4_K"
    # use_more_bits(i, 4): layers 2 and 3 of 4
    assert [a_q4km[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["q4_K", "q4_K", "q6_K", "q6_K"]
    assert a_q2k["blk.0.attn_v.weight"] == "q4_K"             # grouped-query factor 4
    assert types("a/Q4_0")["output.weight"] == "q6_K"
    assert b_q4_0["token_embd.weight"] == "q8_0"              # tied: the output's q6_K, falling back on rows of 160
    assert types("b/Q4_K_S")["blk.0.attn_q.weight"] == "q5_0"  # rows of 160: q4_K falls back
    assert types("c/Q4_K_M")["blk.0.attn_q.weight"] == "f16"   # rows of 40: nothing but f16 fits
    names = [t[0] for t in MIX["outputs"]["b/Q8_0"]["tensors"]]
    assert names.index("blk.10.attn_k.weight") > names.index("blk.9.ffn_up.weight")


@functools.lru_cache(maxsize=None)
def _sha256_once(path: Path) -> str:
    return sha256_file(path)


@pytest.mark.parametrize("case", list(MIX["real"]))
def test_real_model_types_match_llama_cpp(case):
    """Qwen2.5-Coder-0.5B (qwen2, biases, GQA 7) and Gemma 3 270M (tied embeddings, rows of 640), requantized."""
    which, file_type = case.split("/")
    path = real_model(which)
    expected = MIX["real"][case]
    if _sha256_once(path) != expected["source_sha256"]:
        pytest.skip(reason=f"{path} is not the model file the reference was made from (its sha256 differs)")
    model = load(path)
    plan = plan_tensor_types(model.tensors.values(), file_type, model.metadata)
    assert [[p.name, p.target_type.name] for p in plan] == expected["types"]


def test_real_model_requantized_file_is_llama_cpp_s(tmp_path):
    which, file_type = "gemma", "Q8_0"
    expected = MIX["real"][f"{which}/{file_type}"]
    out = quantize_model(real_model(which), tmp_path / "out.gguf", file_type, allow_requantize=True)
    assert (out.path.stat().st_size, sha256_file(out.path)) == (expected["size"], expected["sha256"])


# --------------------------------------------------------------------------------------- llama.cpp's bytes

@pytest.mark.parametrize("case", CASES)
def test_bytes_match_llama_cpp(sources, case, tmp_path):
    """The whole file, byte for byte: metadata, order, alignment and every tensor."""
    source, file_type, options = parse_case(case)
    expected = MIX["outputs"][case]
    out = quantize_model(sources[source], tmp_path / "out.gguf", file_type, **options)
    assert tensor_digests(out.path) == expected["tensors"]
    assert list(load(out.path).metadata) == expected["metadata_keys"]
    assert (out.path.stat().st_size, sha256_file(out.path)) == (expected["size"], expected["sha256"])


# ------------------------------------------------------------------------------------ files our engine runs

def test_quantized_model_loads_and_generates(sources, tmp_path):
    out = tmp_path / "a-q8_0.gguf"
    assert main(["quantize", str(sources["a"]), str(out), "q8_0", "--no-progress"]) == 0
    quantized = ggml_backend.Llama(str(out), n_ctx=64, verbose=False)
    original = ggml_backend.Llama(str(sources["a"]), n_ctx=64, verbose=False)
    tokens = quantized.tokenize(b"Once upon a time", add_bos=True)
    for llm in (quantized, original):
        llm.eval(tokens)
    last_q, last_f = quantized.scores[len(tokens) - 1], original.scores[len(tokens) - 1]
    assert np.isfinite(last_q).all() and last_q.std() > 0.1
    # q8_0 keeps the model: its logits stay close to the f16 original's
    assert np.abs(last_q - last_f).max() < 0.05 * np.abs(last_f).max() + 0.05
    text = quantized("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert len(quantized.tokenize(text.encode(), add_bos=False)) >= 1


def test_ggml_output_holds_the_gguf_tensors(sources, tmp_path):
    gguf, ggml = tmp_path / "a.gguf", tmp_path / "a.bin"
    assert main(["quantize", str(sources["a"]), str(gguf), "Q4_0", "--no-progress"]) == 0
    assert main(["quantize", str(sources["a"]), str(ggml), "Q4_0", "--ggml", "--no-progress"]) == 0
    g, u = load(ggml), load(gguf)
    assert (g.format, g.container, g.version) == ("ggml", "ggjt", 3)
    assert g.hparams["ftype"] == 2 and g.hparams["n_mult"] == 256
    assert sorted(g.tensors) == sorted(u.tensors)
    for name, t in u.tensors.items():
        assert (g.tensors[name].type, g.tensors[name].shape) == (t.type, t.shape), name
        assert np.array_equal(g.tensors[name].data, t.data), name
    assert g.metadata["tokenizer.ggml.tokens"] == u.metadata["tokenizer.ggml.tokens"]
    assert np.array_equal(g.vocab.scores, u.vocab.scores)
    assert np.array_equal(g.vocab.token_types, u.vocab.token_types)
    assert g.metadata["llama.attention.head_count_kv"] == 2   # inferred back from attn_k's shape
    # and the engine computes the same logits from it (the same token ids: GGML-era tokenizers add no leading space)
    logits = []
    for path, extra in ((gguf, {}), (ggml, {"rms_norm_eps": 1e-5})):
        llm = ggml_backend.Llama(str(path), n_ctx=32, verbose=False, **extra)
        llm.eval([1, 450, 1001, 2020, 77])
        logits.append(llm.scores[llm.n_tokens - 1].copy())
    assert np.array_equal(logits[0], logits[1])


def test_ggml_input_quantizes_like_its_gguf_source(sources, tmp_path):
    """A GGML f16 file (written by --ggml F16) in, GGUF and GGML out: the same tensors as from the GGUF source."""
    ggml_f16, from_ggml, from_gguf, ggml_q = (tmp_path / n for n in ("f16.bin", "q.gguf", "ref.gguf", "q.bin"))
    for args in ([sources["a"], ggml_f16, "F16", "--ggml"], [ggml_f16, from_ggml, "Q4_K_S"],
                 [sources["a"], from_gguf, "Q4_K_S"], [ggml_f16, ggml_q, "Q5_1", "--ggml"]):
        assert main(["quantize", *map(str, args), "--no-progress"]) == 0, args
    a, b = load(from_ggml), load(from_gguf)
    assert list(a.tensors) == list(b.tensors)
    for name, t in b.tensors.items():
        assert (a.tensors[name].type, a.tensors[name].shape) == (t.type, t.shape), name
        assert np.array_equal(a.tensors[name].data, t.data), name
    assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
    q, f16 = load(ggml_q), load(ggml_f16)
    assert q.vocab.token_bytes == f16.vocab.token_bytes and q.hparams["ftype"] == 9
    assert f16.vocab.token_bytes[0] == " \u2047 ".encode() and f16.vocab.token_bytes[3] == b"\x00"


# ------------------------------------------------------------------------------------------------ errors

def run_cli(capsys, *args):
    code = main(["quantize", *map(str, args), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, pattern):
    assert code == 1
    assert len(err) == 1 and err[0].startswith("ggml-backend quantize: error: "), err
    assert re.search(pattern, err[0]), err[0]


def test_already_quantized_input_is_refused_unless_allowed(capsys, tmp_path):
    quantized = DATA / "synthetic" / "tiny-llama-q4_0.gguf"
    out = tmp_path / "out.gguf"
    code, err = run_cli(capsys, quantized, out, "q8_0")
    assert_one_line_error(code, err, r"tensor 'output.weight' is already quantized \(q6_K\).*--allow-requantize")
    assert not out.exists() and not list(tmp_path.iterdir())
    code, _ = run_cli(capsys, quantized, out, "q8_0", "--allow-requantize")
    assert code == 0
    assert {t.type.name for t in load(out).tensors.values()} == {"q8_0", "f32"}


@pytest.mark.parametrize("args, pattern", [
    (["{a}", "{out}", "q9_9"], r"unknown file type 'q9_9'; supported: F32, F16"),
    (["{a}", "{out}", "IQ2_XXS"], r"IQ2_XXS is not supported \(an IQ type\)"),
    (["{a}", "{out}", "99"], r"unknown file type id 99"),
    (["{missing}", "{out}", "q4_0"], r"cannot open model file"),
    (["{a}", "{a}", "q4_0"], r"is the input file itself"),
    (["{a}", "{link}", "q4_0"], r"is the input file itself"),
    (["{a}", "{out}", "q4_0", "--output-tensor-type", "q7"], r"unknown ggml type 'q7'"),
    (["{a}", "{out}", "q4_0", "--threads", "0"], r"--threads must be a positive integer"),
    (["{qwen2}", "{out}", "q8_0", "--ggml"], r"a GGML file holds a LLaMA model, not 'qwen2'"),
    (["{a}", "{out}", "bf16", "--ggml"], r"type bf16 cannot be stored in a GGML file"),
])
def test_bad_input_is_one_line_and_writes_nothing(sources, capsys, tmp_path, args, pattern):
    work = tmp_path / "work"
    work.mkdir()
    link = work / "link.gguf"
    link.symlink_to(sources["a"])
    qwen2 = tmp_path / "qwen2.gguf"
    if "{qwen2}" in args:
        model = load(sources["c"])
        metadata = {("qwen2." + k[6:] if k.startswith("llama.") else k): v for k, v in model.metadata.items()}
        metadata["general.architecture"] = "qwen2"
        write_gguf(qwen2, metadata, [(t.name, t.type, t.shape, t.data) for t in model.tensors.values()])
    names = {"a": sources["a"], "out": work / "out.gguf", "missing": tmp_path / "nope.gguf", "link": link,
             "qwen2": qwen2}
    before = sha256_file(sources["a"])
    code, err = run_cli(capsys, *(a.format(**names) for a in args))
    assert_one_line_error(code, err, pattern)
    assert sorted(p.name for p in work.iterdir()) == ["link.gguf"]   # no output, no temporary file
    assert sha256_file(sources["a"]) == before


def test_existing_output_needs_force(sources, capsys, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    code, err = run_cli(capsys, sources["c"], out, "q8_0")
    assert_one_line_error(code, err, r"exists \(use --force to overwrite\)")
    assert out.read_bytes() == b"keep me"
    assert run_cli(capsys, sources["c"], out, "q8_0", "--force")[0] == 0
    assert load(out).metadata["general.file_type"] == 7


def test_full_disk_leaves_the_old_output_and_no_partial_file(sources, capsys, tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old model")
    real_fdopen = os.fdopen

    class FullDisk:
        """A file whose device fills up after 100 kB."""
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(memoryview(data).cast("B"))
            if self.written > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("ggml_backend.formats.gguf.os.fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    code, err = run_cli(capsys, sources["a"], out, "q8_0", "--force")
    assert_one_line_error(code, err, r"out\.gguf: no space left on the device while writing the quantized model")
    assert out.read_bytes() == b"old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_nan_in_a_tensor_is_refused(sources, capsys, tmp_path):
    model = load(sources["c"])
    tensors = [(t.name, t.type, t.shape, t.data) for t in model.tensors.values()]
    bad = model.tensors["blk.1.ffn_down.weight"].dequantize().astype(np.float16)
    bad[3, 7] = np.nan
    tensors = [(n, ty, s, bad if n == "blk.1.ffn_down.weight" else d) for n, ty, s, d in tensors]
    src = tmp_path / "nan.gguf"
    write_gguf(src, model.metadata, tensors, value_types=model.metadata_types)
    code, err = run_cli(capsys, src, tmp_path / "out.gguf", "q8_0")
    assert_one_line_error(code, err, r"tensor 'blk.1.ffn_down.weight' holds nan at row 3, column 7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


def test_python_api_rejects_unknown_arguments_and_names_types(sources, tmp_path):
    with pytest.raises(TypeError):
        quantize_model(sources["c"], tmp_path / "x.gguf", "q8_0", imatrix="x.dat")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        quantize_model(sources["c"], tmp_path / "x.gguf", "q8_0", threads=0)
    assert ggml_backend.quantize_model is quantize_model
    assert parse_file_type("q4_k").name == "Q4_K_M" and parse_file_type(15).name == "Q4_K_M"
    assert parse_file_type("17") is FILE_TYPES["Q5_K_M"]


def test_output_name_defaults_like_llama_quantize(sources, capsys, tmp_path):
    src = tmp_path / "model-f16.gguf"
    src.write_bytes(sources["c"].read_bytes())
    assert run_cli(capsys, src, "Q8_0")[0] == 0
    assert load(tmp_path / "ggml-model-Q8_0.gguf").metadata["general.file_type"] == 7


def test_dry_run_prints_the_plan_and_writes_nothing(sources, capsys, tmp_path):
    assert main(["quantize", str(sources["a"]), str(tmp_path / "x.gguf"), "Q4_K_M", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"blk\.3\.ffn_down\.weight .* f16 -> q6_K", out)
    assert "model size" in out and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- streaming

_MEMORY_PROBE = r"""
import json, resource, sys, tracemalloc
import numpy as np
sys.path.insert(0, sys.argv[3])
from ggml_backend.tools.quantize import quantize_model, convert_tensor
from ggml_backend.formats import load
# warm the kernels (numba) so that only the quantization itself is measured
list(convert_tensor(next(t for t in load(sys.argv[1]).tensors.values() if t.type.name == "f16"), "q8_0"))

def rss():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}

before = rss()["VmRSS"]
tracemalloc.start()
quantize_model(sys.argv[1], sys.argv[2], "Q8_0")
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"tracemalloc_peak": peak, "rss_high_water_growth": rss()["VmHWM"] - before}))
"""


def test_memory_stays_a_few_tensors_not_the_model(tmp_path):
    """A 64 MB f16 model of 40 tensors: the quantizer's peak memory is a small part of it."""
    n_embd, n_layer = 1024, 8
    tensors = []
    pool = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float16) * np.float16(0.02)
    for i in range(n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors.append((f"blk.{i}.{part}.weight", "f16", (n_embd, n_embd),
                            np.roll(pool, i * 7 + len(part))))
        tensors.append((f"blk.{i}.attn_norm.weight", "f32", (n_embd,), np.ones(n_embd, np.float32)))
    metadata = {"general.architecture": "llama", "llama.block_count": n_layer, "llama.embedding_length": n_embd,
                "llama.attention.head_count": 8, "general.file_type": 1}
    src = tmp_path / "big.gguf"
    write_gguf(src, metadata, tensors)
    size = src.stat().st_size
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(src), str(tmp_path / "q8.gguf"), str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["tracemalloc_peak"] < size / 4, figures
    assert figures["rss_high_water_growth"] < size / 2, figures
    assert load(tmp_path / "q8.gguf").tensors["blk.7.attn_v.weight"].type.name == "q8_0"
