"""Where tests find shared reference data.

``SYNTHETIC_DIR`` prefers ``tests/data/synthetic`` (a copy inside the repository) and falls back to the
workplace's ``../shared/reference/synthetic`` next to the repository root. Tests call ``synthetic_file`` (or
``require_synthetic``), which skips with a reason when the data is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
_CANDIDATES = [TESTS_DIR / "data" / "synthetic", REPO_ROOT.parent / "shared" / "reference" / "synthetic"]
SYNTHETIC_DIR = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])

# Every quantization type of the tiny synthetic Llama (tiny-llama-TYPE.gguf and tiny-llama-TYPE.ggmlv3.bin).
_TYPES = ["f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K_M", "q4_K_M", "q5_K_M", "q6_K"]


def synthetic_types() -> list[str]:
    return list(_TYPES)


def require_synthetic() -> Path:
    if not SYNTHETIC_DIR.is_dir():
        pytest.skip(f"synthetic reference data not found (looked in {', '.join(map(str, _CANDIDATES))})")
    return SYNTHETIC_DIR


def synthetic_file(type_name: str, kind: str = "gguf") -> Path:
    """``kind``: "gguf" or "ggml" (the ggmlv3.bin twin)."""
    suffix = ".gguf" if kind == "gguf" else ".ggmlv3.bin"
    path = require_synthetic() / f"tiny-llama-{type_name}{suffix}"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def real_model(which: str) -> Path:
    """``which``: "qwen" or "gemma"; skips when the model package is not installed."""
    from ggml_backend import default_model
    try:
        return default_model.default_model_path(progress=False) if which == "qwen" else default_model.gemma_model_path()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"{which} model not available: {exc}")
