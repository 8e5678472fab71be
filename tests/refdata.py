"""Where tests find reference data (outputs of llama.cpp and ctransformers, see tests/data/README.md).

The workplace's ``../shared/reference`` (all eleven synthetic types) is preferred when it exists; a fresh clone
uses the subset copied into ``tests/data``. ``synthetic_types()`` lists the types present in the chosen copy, so
tests parametrize over what is there instead of skipping.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
_SHARED = REPO_ROOT.parent / "shared" / "reference"
_LOCAL = TESTS_DIR / "data"
REFERENCE_DIR = _SHARED if (_SHARED / "synthetic" / "synthetic.json").is_file() else _LOCAL
SYNTHETIC_DIR = REFERENCE_DIR / "synthetic"
REAL_DIR = REFERENCE_DIR / "real"

# Every quantization type of the tiny synthetic Llama (tiny-llama-TYPE.gguf and tiny-llama-TYPE.ggmlv3.bin).
_TYPES = ["f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K_M", "q4_K_M", "q5_K_M", "q6_K"]


def synthetic_types() -> list[str]:
    """Types whose GGUF file, GGML twin and reference outputs are all present."""
    return [t for t in _TYPES if (SYNTHETIC_DIR / f"tiny-llama-{t}.gguf").is_file()
            and (SYNTHETIC_DIR / f"tiny-llama-{t}.ggmlv3.bin").is_file()]


def synthetic_gguf_files() -> list[Path]:
    """Every synthetic GGUF file present (tests/data adds q3_K_M and q5_K_M for their q3_K / q5_K tensors)."""
    return [SYNTHETIC_DIR / f"tiny-llama-{t}.gguf" for t in _TYPES if (SYNTHETIC_DIR / f"tiny-llama-{t}.gguf").is_file()]


def full_synthetic_set() -> bool:
    """True when all eleven types are here (the workplace's shared/reference), not the subset in tests/data."""
    return len(synthetic_types()) == len(_TYPES)


def require_synthetic() -> Path:
    if not SYNTHETIC_DIR.is_dir():
        pytest.skip(reason=f"synthetic reference data not found in {SYNTHETIC_DIR}")
    return SYNTHETIC_DIR


def synthetic_file(type_name: str, kind: str = "gguf") -> Path:
    """``kind``: "gguf" or "ggml" (the ggmlv3.bin twin)."""
    suffix = ".gguf" if kind == "gguf" else ".ggmlv3.bin"
    path = require_synthetic() / f"tiny-llama-{type_name}{suffix}"
    if not path.is_file():
        pytest.skip(reason=f"{path} is missing")
    return path


@lru_cache(maxsize=None)
def synthetic_json() -> dict:
    return json.loads((SYNTHETIC_DIR / "synthetic.json").read_text(encoding="utf-8"))


def llamacpp_logits(type_name: str) -> np.ndarray:
    """llama.cpp's logits [32, n_vocab] for synthetic_json()['token_sequence'] (float32)."""
    return np.load(SYNTHETIC_DIR / synthetic_json()["files"][type_name]["llamacpp_logits"]).astype(np.float32)


def ctransformers_last_logits(type_name: str) -> np.ndarray:
    return np.load(SYNTHETIC_DIR / synthetic_json()["files"][type_name]["ctransformers_last_logits"]).astype(np.float32)


@lru_cache(maxsize=None)
def real_json(which: str) -> dict:
    name = "qwen2.5-coder-0.5b.json" if which == "qwen" else "gemma-3-270m.json"
    return json.loads((REAL_DIR / name).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def real_token_by_token(which: str) -> list[dict]:
    """llama.cpp's top-10 logits (at ``first_top10_ids``) when it evaluates each shared prompt one token at a time:
    ``tests/data/real/llamacpp_token_by_token.json``, made here by ``make_token_by_token.py`` (not in shared/)."""
    path = _LOCAL / "real" / "llamacpp_token_by_token.json"
    return json.loads(path.read_text(encoding="utf-8"))["models"][which]


def real_model(which: str) -> Path:
    """``which``: "qwen" or "gemma"; skips when the model package is not installed."""
    from ggml_backend import default_model
    try:
        return default_model.default_model_path(progress=False) if which == "qwen" else default_model.gemma_model_path()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(reason=f"{which} model not available: {exc}")
