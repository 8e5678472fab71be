"""``ggml-backend info`` and the CLI dispatcher."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ggml_backend.cli.main import COMMANDS, main
from refdata import synthetic_file


def test_info_json_on_ggml_file(capsys):
    assert main(["info", str(synthetic_file("q4_K_M", "ggml")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["container"], info["version"], info["architecture"]) == ("ggml", "ggjt", 3, "llama")
    assert info["hyperparameters"]["embedding_length"] == 256
    assert info["hyperparameters"]["attention.head_count_kv"] == 8
    assert info["vocabulary"]["size"] == 4096
    assert info["tensor_count"] == 39
    assert {k: v["tensors"] for k, v in info["tensor_types"].items()} == {"q4_K": 25, "q6_K": 5, "f32": 9}
    assert info["parameters"] == 5_507_328
    assert info["file_size"] == synthetic_file("q4_K_M", "ggml").stat().st_size
    assert info["file_type_name"] == "MOSTLY_Q4_K_M"
    total = sum(v["bytes"] for v in info["tensor_types"].values())
    assert info["bits_per_weight"] == pytest.approx(total * 8 / 5_507_328, abs=1e-4)


def test_info_text_via_python_m():
    result = subprocess.run([sys.executable, "-m", "ggml_backend", "info", str(synthetic_file("q4_0"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GGUF (gguf v3)" in out and "architecture:    llama" in out
    assert "4096 tokens (llama)" in out and "q4_0" in out and "bits per weight: 4.90" in out


def test_dispatcher_lists_commands_and_reports_errors(tmp_path, capsys):
    assert main([]) == 2
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in COMMANDS)
    missing = tmp_path / "nope.gguf"
    assert main(["info", str(missing)]) == 1
    assert "nope.gguf" in capsys.readouterr().err
