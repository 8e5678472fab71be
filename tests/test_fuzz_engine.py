"""Malformed model files never crash the engine: seeded mutations of the tiny synthetic models go through load,
engine construction (``Llama``) and a first token, and either run or raise ``ModelFileError``, nothing else (no
KeyError, ZeroDivisionError, numpy broadcast error, OverflowError, or a gigabyte allocation from a changed count).

A few hundred cases run in CI; ``FUZZ_CASES=10000 python -m pytest tests/test_fuzz_engine.py`` runs a release check.
Each failure names its case (seed, file, what was changed), which replays alone with ``FUZZ_SEED=<seed>``.
"""
from __future__ import annotations

import os
import random
import signal
import struct
import traceback

import pytest

import ggml_backend
from ggml_backend import Llama
from ggml_backend.formats import ModelFileError
from refdata import synthetic_file

N_CASES = int(os.environ.get("FUZZ_CASES", "300"))
FIRST_SEED = int(os.environ.get("FUZZ_SEED", "0"))
EDGE_U32 = [0, 1, 2, 3, 7, 31, 255, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
CASE_TIME_LIMIT_S = 20   # one case (load, build, a first token) takes ~30 ms; past this it hangs or thrashes
EDGE_F32 = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-45, 3e38, 1.0]


def _gguf_value_spots(raw: bytes) -> list[tuple[str, int, int]]:
    """(key, offset of its u32 type field, offset of its value) for the architecture's scalar hyper-parameters."""
    spots = []
    for key in (b"llama.context_length", b"llama.embedding_length", b"llama.block_count",
                b"llama.feed_forward_length", b"llama.rope.dimension_count", b"llama.attention.head_count",
                b"llama.attention.head_count_kv", b"llama.attention.layer_norm_rms_epsilon", b"llama.rope.freq_base",
                b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id", b"general.architecture"):
        at = raw.find(struct.pack("<Q", len(key)) + key)
        if at >= 0:
            type_at = at + 8 + len(key)
            spots.append((key.decode(), type_at, type_at + 4))
    return spots


def _tensor_dim_spots(raw: bytes, model) -> list[tuple[str, int]]:
    """(tensor name, offset of its first dimension) in the tensor-info records (GGUF and GGML)."""
    spots = []
    for t in model.tensors.values():
        name = t.source_name.encode()
        at = raw.find(name)
        if at < 0:
            continue
        if model.format == "gguf":
            spots.append((t.name, at + len(name) + 4))     # name, n_dims u32, then dims u64
        else:
            spots.append((t.name, at - 4 * len(t.shape)))  # n_dims, name_len, type, dims u32, then the name
    return spots


def _mutate(raw: bytes, kind: str, model, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    first_data = min(t.offset for t in model.tensors.values())
    choice = rng.randrange(10)
    if kind == "gguf" and choice < 4:
        key, type_at, value_at = rng.choice(_gguf_value_spots(raw))
        (value_type,) = struct.unpack_from("<I", raw, type_at)
        if choice == 3 and key != "general.architecture":      # another value type: a string where a count was
            new_type = rng.choice([0, 1, 4, 5, 6, 7, 10, 12])
            data[type_at:type_at + 4] = struct.pack("<I", new_type)
            return bytes(data), f"{key}: value type {value_type} -> {new_type}"
        if value_type == 6:
            value = rng.choice(EDGE_F32)
            data[value_at:value_at + 4] = struct.pack("<f", value)
        elif value_type == 8:
            value = rng.randrange(256)
            data[value_at + 8 + rng.randrange(5)] = value      # a byte of the architecture's name
        else:
            value = rng.choice(EDGE_U32 + [rng.randrange(2 ** 32)])
            data[value_at:value_at + 4] = struct.pack("<I", value)
        return bytes(data), f"{key} = {value}"
    if kind == "ggml" and choice < 4:
        index = rng.randrange(7)                                # n_vocab n_embd n_mult n_head n_layer n_rot ftype
        value = rng.choice(EDGE_U32 + [rng.randrange(2 ** 32)])
        data[8 + 4 * index:12 + 4 * index] = struct.pack("<I", value)
        return bytes(data), f"hparam #{index} = {value}"
    if choice < 7:
        name, at = rng.choice(_tensor_dim_spots(raw, model))
        width = 8 if kind == "gguf" else 4
        (old,) = struct.unpack_from("<Q" if width == 8 else "<I", raw, at)
        new = rng.choice([0, 1, old // 2, old * 2, old + 32, old - 32, 2 ** 31, rng.randrange(1, 4096)])
        new = max(0, min(new, 2 ** (8 * width) - 1))
        data[at:at + width] = struct.pack("<Q" if width == 8 else "<I", new)
        return bytes(data), f"tensor {name} dim {old} -> {new}"
    pos = rng.randrange(0, first_data - 8)
    new = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8])))
    data[pos:pos + len(new)] = new
    return bytes(data), f"bytes at {pos} = {new.hex()}"


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"the case ran past {CASE_TIME_LIMIT_S} s")


def _first_token(path) -> str:
    """load, build the engine, evaluate a prompt and sample one token; 'ran' or 'refused'."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIME_LIMIT_S)
    try:
        ggml_backend.load(path)
        llm = Llama(str(path), n_ctx=32, n_threads=1, verbose=False)
        prompt = [llm.token_bos()] if llm.token_bos() is not None else []
        prompt += [t % llm.n_vocab() for t in (450, 996, 1735)]
        token = next(iter(llm.generate_tokens(prompt, max_tokens=1)))
        assert 0 <= token < llm.n_vocab()
        return "ran"
    except ModelFileError as exc:
        assert str(path) in str(exc)
        return "refused"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["gguf", "ggml"])
def test_malformed_files_through_load_engine_and_first_token(tmp_path, kind):
    source = synthetic_file("q4_0", kind)
    raw = source.read_bytes()
    model = ggml_backend.load(source)
    path = tmp_path / source.name
    outcomes = {"ran": 0, "refused": 0}
    failures = []
    for seed in range(FIRST_SEED, FIRST_SEED + N_CASES // 2):
        rng = random.Random(f"{kind}-{seed}")
        data, change = _mutate(raw, kind, model, rng)
        path.write_bytes(data)
        try:
            outcomes[_first_token(path)] += 1
        except Exception as exc:  # noqa: BLE001 (anything but ModelFileError is the failure being looked for)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"seed {seed} ({change}): {type(exc).__name__}: {str(exc)[:200]} "
                            f"[{os.path.basename(where.filename)}:{where.lineno}]")
    print(f"\n{kind}: {outcomes}")
    assert not failures, f"{len(failures)} of {N_CASES // 2} cases raised outside ModelFileError:\n" + \
        "\n".join(failures[:30])
    assert outcomes["refused"] > N_CASES // 10
