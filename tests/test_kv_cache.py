"""The KV cache's types (f16, the default, f32 and q8_0): the attention kernel on each storage, logits against
llama.cpp's with the same cache types (tests/data/kv_cache, made by its make_reference.py), state save/restore,
context shift, the CLI and server flags."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ggml_backend import Llama
from ggml_backend.model.attention import SequencesAttention, attention
from ggml_backend.model.kv_cache import GROW_CHUNK, CacheTensor, KVCache, cache_type, hadamard_rotation, rotate
from ggml_backend.quant.matmul import KERNEL_ISA

from refdata import synthetic_file

DATA = Path(__file__).resolve().parent / "data" / "kv_cache"
PAIRS = ["f32/f32", "f16/f16", "q8_0/f16", "q8_0/q8_0"]


def reference() -> dict:
    return json.loads((DATA / "llamacpp_cache_types.json").read_text())


def test_cache_type_names_and_ids():
    assert [cache_type(v) for v in (None, "F16", 0, 1, 8, " q8_0 ")] == ["f16", "f16", "f32", "f16", "q8_0", "q8_0"]
    with pytest.raises(NotImplementedError, match="q4_0"):
        cache_type("q4_0")
    with pytest.raises(NotImplementedError, match="2"):
        cache_type(2)
    for bad in ("f64", 99, True, 1.0, ""):
        with pytest.raises(ValueError, match="not a cache type"):
            cache_type(bad)


def test_storage_sizes_follow_the_type():
    sizes = {t: KVCache(2, 64, 2, 64, 64, t, t).nbytes for t in ("f32", "f16", "q8_0")}
    values = 2 * 2 * 2 * 64 * 64
    assert sizes == {"f32": 4 * values, "f16": 2 * values, "q8_0": values * 34 // 32}
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCache(1, 8, 1, 40, 40, "q8_0", "f16")


def reference_attention(q, keys, values, type_k, type_v, start, group, scale):
    """ggml's arithmetic for each cache type, in plain numpy (float64 sums): keys/values as stored; q as the
    product with the keys sees it (f16: rounded to f16; q8_0: quantized to q8_0); weights rounded to f16 for f16
    values."""
    from ggml_backend import quant
    if type_k == "f16":
        q = q.astype(np.float16).astype(np.float32)
    elif type_k == "q8_0":         # in the rotated space the q8_0 keys are stored in
        q = rotate(q)
        q = quant.dequantize("q8_0", quant.quantize("q8_0", q), q.shape)
        keys = rotate(keys)
    if type_v == "q8_0":
        values = rotate(values)
    n_tokens, n_head, _ = q.shape
    out = np.zeros((n_tokens, n_head, values.shape[2]))
    for t in range(n_tokens):
        for h in range(n_head):
            n = start + t + 1
            s = keys[h // group, :n].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            if type_v == "f16":
                p = p.astype(np.float16).astype(np.float64)
            out[t, h] = p @ values[h // group, :n].astype(np.float64)
    return rotate(out) if type_v == "q8_0" else out


def quant_error(values):
    from ggml_backend import quant
    return np.abs(quant.dequantize("q8_0", quant.quantize("q8_0", values), values.shape) - values).max()


def test_hadamard_rotation_is_orthogonal_and_only_for_power_of_two_multiples_of_64():
    for size in (32, 64, 128):
        h = hadamard_rotation(size)
        assert np.allclose(h @ h, np.eye(size), atol=1e-6) and np.array_equal(h, h.T)
    assert hadamard_rotation(80) is None and hadamard_rotation(0) is None
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    assert np.allclose(rotate(rotate(x)), x, atol=1e-5)
    assert CacheTensor("q8_0", (1, 1, 4, 64)).rotated and CacheTensor("q8_0", (1, 1, 4, 256)).rotated
    assert not CacheTensor("q8_0", (1, 1, 4, 32)).rotated and not CacheTensor("q8_0", (1, 1, 4, 192)).rotated
    assert not CacheTensor("f16", (1, 1, 4, 64)).rotated


@pytest.mark.parametrize("pair", PAIRS + ["f16/q8_0", "f32/f16"])
def test_attention_kernel_follows_ggml_arithmetic_for_each_storage(pair):
    type_k, type_v = pair.split("/")
    rng = np.random.default_rng(1)
    keys, values = (rng.standard_normal((2, 24, 64)).astype(np.float32) * 4 for _ in range(2))
    keys[0, :, 5] += 40.0                                # an outlier dimension, as Qwen's keys have
    q = rng.standard_normal((3, 4, 64)).astype(np.float32)
    k, v = CacheTensor(type_k, (1, 2, 24, 64)), CacheTensor(type_v, (1, 2, 24, 64))
    k.write(0, 0, keys)
    v.write(0, 0, values)
    ours = attention(q, k.layer(0), v.layer(0), 21, 2, 0, 0.125)
    expected = reference_attention(q, k.read(0, 0, 24), v.read(0, 0, 24), type_k, type_v, 21, 2, 0.125)
    assert np.abs(ours - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    # and the stored values are the type's rounding of what was written
    bound = {"f32": 0.0, "f16": np.abs(keys).max() / 1024, "q8_0": np.abs(rotate(keys)).max() / 127 / 2 * 1.01 * 8}[type_k]
    assert np.abs(k.read(0, 0, 24) - keys).max() <= bound
    if type_k == "q8_0":   # the rotation spreads the outlier dimension: finer blocks than the keys' own
        plain = quant_error(keys)
        assert np.abs(k.read(0, 0, 24) - keys).max() < plain


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("window", [0, 5])
def test_each_attention_row_is_the_same_alone_or_in_a_batch(pair, window):
    """A query's output does not depend on the batch it came in (the kernel sums each row's keys in fours from its
    first key, whatever the batch): a 13-token prompt on top of 6 cached tokens gives every row the bits it gets
    as a one-token step at its position, for key counts on either side of a multiple of four."""
    type_k, type_v = pair.split("/")
    rng = np.random.default_rng(5)
    keys, values = (rng.standard_normal((2, 19, 64)).astype(np.float32) * 3 for _ in range(2))
    q = rng.standard_normal((13, 4, 64)).astype(np.float32)
    k, v = CacheTensor(type_k, (1, 2, 32, 64)), CacheTensor(type_v, (1, 2, 32, 64))
    k.write(0, 0, keys)
    v.write(0, 0, values)
    batch = attention(q, k.layer(0), v.layer(0), 6, 2, window, 0.125)
    for t in range(13):
        alone = attention(q[t:t + 1], k.layer(0), v.layer(0), 6 + t, 2, window, 0.125)
        assert np.array_equal(alone[0].view(np.uint32), batch[t].view(np.uint32)), t
    # the kernel takes rows in pairs from both ends (for even work per thread): an odd count of rows (13 tokens of
    # one head each) has a middle row, computed once like every other
    one_head = np.ascontiguousarray(q[:, :1])
    k1, v1 = CacheTensor(type_k, (1, 1, 32, 64)), CacheTensor(type_v, (1, 1, 32, 64))
    k1.write(0, 0, keys[:1])
    v1.write(0, 0, values[:1])
    batch = attention(one_head, k1.layer(0), v1.layer(0), 6, 1, window, 0.125)
    for t in range(13):
        alone = attention(one_head[t:t + 1], k1.layer(0), v1.layer(0), 6 + t, 1, window, 0.125)
        assert np.array_equal(alone[0].view(np.uint32), batch[t].view(np.uint32)), t


@pytest.mark.parametrize("pair", ["f32/f32", "f16/f16", "f32/f16"])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_each_head_is_the_same_whatever_heads_share_its_tile(pair, head_dim):
    """The kernel takes the query heads of one KV head four at a time (each key and value converted once for
    them): seven heads of one KV head (tiles of four and three) give every head the bits it gets with a KV head of
    its own (tiles of one), over 1 to 11 keys on either side of a multiple of four, for head sizes with and
    without a tail past a multiple of 16."""
    type_k, type_v = pair.split("/")
    rng = np.random.default_rng(head_dim)
    keys, values = (rng.standard_normal((1, 11, head_dim)).astype(np.float32) * 3 for _ in range(2))
    q = rng.standard_normal((11, 7, head_dim)).astype(np.float32)
    shared_k, shared_v = CacheTensor(type_k, (1, 1, 16, head_dim)), CacheTensor(type_v, (1, 1, 16, head_dim))
    shared_k.write(0, 0, keys)
    shared_v.write(0, 0, values)
    own_k, own_v = CacheTensor(type_k, (1, 7, 16, head_dim)), CacheTensor(type_v, (1, 7, 16, head_dim))
    own_k.write(0, 0, np.repeat(keys, 7, axis=0))
    own_v.write(0, 0, np.repeat(values, 7, axis=0))
    shared = attention(q, shared_k.layer(0), shared_v.layer(0), 0, 7, 0, 0.125)
    own = attention(q, own_k.layer(0), own_v.layer(0), 0, 1, 0, 0.125)
    assert np.array_equal(shared.view(np.uint32), own.view(np.uint32))


def test_decode_tiles_give_every_thread_a_tile_and_are_found_again_from_their_count():
    """The decode step's attention tasks are tiles of heads: as wide as four while every thread still gets one
    (Gemma 3 270M: one KV head of four heads, two threads: tiles of two), and the phase finds the width from the
    task count alone."""
    from ggml_backend.model.attention import decode_tile_width, head_tile_count, tile_width_of

    assert decode_tile_width(2, 7, 2) == 4 and head_tile_count(2, 7, 4) == 4      # Qwen2.5-0.5B
    assert decode_tile_width(1, 4, 2) == 2 and head_tile_count(1, 4, 2) == 2      # Gemma 3 270M
    assert decode_tile_width(1, 4, 1) == 4 and decode_tile_width(1, 4, 8) == 1
    assert decode_tile_width(32, 1, 2) == 4 and head_tile_count(32, 1, 4) == 32   # one head a KV head: tiles of one
    for n_head_kv in (1, 2, 8):
        for group in range(1, 9):
            for width in (4, 2, 1):
                found = tile_width_of(n_head_kv, group, head_tile_count(n_head_kv, group, width))
                assert head_tile_count(n_head_kv, group, found) == head_tile_count(n_head_kv, group, width)
                assert found == width or (group + found - 1) // found == (group + width - 1) // width == 1


@pytest.mark.parametrize("pair", ["f32/f32", "f16/f16", "f32/f16"])
@pytest.mark.parametrize("window", [0, 5])
def test_sequences_attention_gives_each_sequence_its_own_numbers(pair, window):
    """One launch for the rows of several sequences (model/attention.py's SequencesAttention: a decode step of
    N sequences, a prompt chunk beside decode steps) gives every row the bits ``attention`` gives it over its own
    cache alone; caches of other storages are not taken, and a cache that moved is refused, not read."""
    type_k, type_v = pair.split("/")
    rng = np.random.default_rng(7)
    lengths, news = [3, 11, 1, 8], [1, 1, 4, 1]     # cached positions, rows this pass (one is a prompt chunk)
    caches = []
    for cached, new in zip(lengths, news):
        cache = KVCache(2, 4 * GROW_CHUNK, 2, 64, 64, type_k, type_v, capacity=8)
        for layer in range(2):
            kv = rng.standard_normal((2, cached + new, 2, 64)).astype(np.float32) * 3
            cache.store(layer, 0, kv[0], kv[1])
        caches.append(cache)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(lengths, news)])
    batch = SequencesAttention(caches, news, positions)
    q = rng.standard_normal((sum(news), 4, 64)).astype(np.float32)
    for layer in range(2):
        together = batch(q, layer, 2, window, 0.125)
        first = 0
        for cache, cached, new in zip(caches, lengths, news):
            alone = attention(q[first:first + new], cache.k.layer(layer), cache.v.layer(layer), cached, 2, window,
                              0.125)
            assert np.array_equal(alone.view(np.uint32), together[first:first + new].view(np.uint32))
            first += new
    assert SequencesAttention.possible(caches)
    assert not SequencesAttention.possible(caches[:1])
    assert not SequencesAttention.possible([caches[0], KVCache(2, 64, 2, 64, 64, "q8_0", type_v)])
    if type_k != type_v:
        assert not SequencesAttention.possible([caches[0], KVCache(2, 64, 2, 64, 64, type_v, type_v)])
    data = caches[1].k.data
    caches[1].k.grow(4 * GROW_CHUNK)                      # growing moves nothing (the arrays span n_ctx) ...
    assert caches[1].k.data is data
    batch(q, 0, 2, window, 0.125)
    caches[1].k.release()                                 # ... releasing does: the pass's addresses are stale
    with pytest.raises(RuntimeError, match="reallocated"):
        batch(q, 0, 2, window, 0.125)


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_read_write_move_save_load_round_trip(kind):
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((2, 10, 64)).astype(np.float32)
    t = CacheTensor(kind, (3, 2, 16, 64))
    t.write(1, 3, rows)
    back = t.read(1, 3, 13)
    if kind == "q8_0":   # q8_0 rounds in the rotated space: half a step of the rotated rows' blocks there
        assert np.abs(rotate(back - rows)).max() <= np.abs(rotate(rows)).max() / 127 / 2 * 1.01
    else:
        assert np.abs(back - rows).max() <= {"f32": 0.0, "f16": 2e-3}[kind]
    saved = t.saved(13)
    t.move(slice(3, 13), slice(0, 10))
    assert np.array_equal(t.read(1, 0, 10), back)
    other = CacheTensor(kind, (3, 2, 16, 64))
    other.load(saved)
    assert np.array_equal(other.read(1, 3, 13), back)


def synthetic_logits(type_k, type_v, sequence):
    llm = Llama(str(synthetic_file("q4_0")), n_ctx=64, logits_all=True, verbose=False, type_k=type_k, type_v=type_v)
    llm.eval(sequence)
    logits = llm.scores[len(sequence) - 4:len(sequence)].copy()
    llm.close()
    return logits


@pytest.mark.parametrize("pair", PAIRS)
def test_synthetic_logits_match_llama_cpp_with_the_same_cache_types(pair):
    ref = reference()
    theirs = np.load(DATA / "llamacpp_synthetic_logits.npz")
    type_k, type_v = pair.split("/")
    ours = synthetic_logits(type_k, type_v, ref["token_sequence"])
    same = float(np.abs(ours - theirs[pair.replace("/", "-")].astype(np.float32)).max())
    # the random-weight model is chaotic: llama.cpp's own f16 and f32 caches differ by 0.087 here; ours stay
    # within that of llama.cpp with the same cache. The reference was made on an AVX512-VNNI CPU, where a q8_0 key
    # cache gives llama.cpp's numbers within 0.001; llama.cpp itself on an AVX2-only Zen 3 (3 December 2026) was
    # 0.069 from that reference with q8_0/f16 (float sums in another order), so the tight bound holds only there.
    tight = KERNEL_ISA is not None and KERNEL_ISA.name == "avx512vnni"
    limit = {"q8_0/f16": 0.01 if tight else 0.1}.get(pair, 0.1)
    assert same <= limit, f"{pair}: max |ours - llama.cpp| = {same:.4f}"


@pytest.fixture(scope="module")
def real_prompt_logits():
    ref = reference()
    out = {}
    base = Llama(n_ctx=64, verbose=False)
    tokens = base.tokenize(ref["real_prompt"].encode(), add_bos=True, special=True)
    assert len(tokens) == ref["real"]["f16/f16"]["tokens"]
    for pair in PAIRS:
        type_k, type_v = pair.split("/")
        llm = Llama(base.model_path, n_ctx=64, verbose=False, type_k=type_k, type_v=type_v)
        llm.eval(tokens)
        out[pair] = llm.scores[len(tokens) - 1].copy()
        llm.close()
    base.close()
    return out


@pytest.mark.parametrize("pair", PAIRS)
def test_real_model_top_logits_match_llama_cpp_with_the_same_cache_types(real_prompt_logits, pair):
    ref = reference()["real"][pair]
    ours = real_prompt_logits[pair]
    assert int(np.argmax(ours)) == ref["top_ids"][0]
    diff = float(np.abs(ours[ref["top_ids"][:10]] - np.array(ref["top_logits"][:10])).max())
    # within 0.25 of llama.cpp (the engines' usual distance on this model) for every pair: the q8_0 caches
    # only get there because they store Hadamard-rotated heads as llama.cpp does (unrotated: 0.9 off)
    assert diff <= 0.25, f"{pair}: top-10 logits differ from llama.cpp's by up to {diff:.3f}"


@pytest.mark.parametrize("pair", ["q8_0/q8_0", "f32/f16"])
def test_state_and_context_shift_work_in_every_type(pair):
    type_k, type_v = pair.split("/")
    llm = Llama(str(synthetic_file("q4_0")), n_ctx=32, verbose=False, type_k=type_k, type_v=type_v, seed=3)
    first = llm.create_completion("Hello world", max_tokens=4, temperature=0)["choices"][0]["text"]
    state = llm.save_state()
    llm.reset()
    llm.load_state(state)
    assert llm.create_completion("Hello world", max_tokens=4, temperature=0)["choices"][0]["text"] == first
    # running past n_ctx shifts the context (keys read, re-rotated and written back in their cache type)
    llm.reset()
    produced = list(llm.generate_tokens(llm.tokenize(b"Hello world"), max_tokens=60, stop_tokens=[]))
    assert len(produced) == 60 and llm.n_tokens <= 32
    other = Llama(str(synthetic_file("q4_0")), n_ctx=32, verbose=False)
    with pytest.raises(ValueError, match="cache types differ"):
        other.load_state(state)
    llm.close()
    other.close()


def test_new_context_keeps_the_cache_types():
    llm = Llama(str(synthetic_file("q4_0")), n_ctx=32, verbose=False, type_k=8, type_v=0)
    other = llm.new_context()
    assert (other.cache.type_k, other.cache.type_v) == ("q8_0", "f32")
    llm.close()


def test_cli_cache_type_flags(capsys):
    from ggml_backend.cli.main import main
    model = str(synthetic_file("q4_0"))
    assert main(["run", "-m", model, "-p", "Hello", "-n", "3", "--temp", "0", "--log-disable",
                 "-ctk", "q8_0", "--cache-type-v", "f32"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["run", "-m", model, "-p", "Hello", "-n", "3", "-ctk", "q4_0"])
    assert "invalid choice" in capsys.readouterr().err


def test_server_config_reads_cache_types(tmp_path):
    from ggml_backend.server.config import ModelConfig, load_models_file
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - alias: a\n    cache_type_k: Q8_0\n    cache_type_v: f32\n")
    [model] = load_models_file(str(path), ModelConfig(alias="x"))
    assert (model.cache_type_k, model.cache_type_v) == ("q8_0", "f32")
    path.write_text("models:\n  - alias: a\n    cache_type_k: q4_0\n")
    with pytest.raises(ValueError, match="models\\[0\\].*not implemented"):
        load_models_file(str(path), ModelConfig(alias="x"))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
def test_cache_memory_comes_with_the_positions_written_and_growing_never_copies():
    """A cache spans n_ctx positions from the start without holding their memory: a 7B-shaped cache of 4096
    positions (1 GiB in f16) with 100 positions written holds about 100 positions' worth, and growing it keeps
    its arrays (the first decode step after a long prompt used to copy the whole cache to a doubled one)."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((100, 8, 128)).astype(np.float32)
    KVCache(1, 128, 8, 128, 128, "f16", "f16").store(0, 0, rows, rows)    # the store's kernel loaded first
    before = _resident_bytes()
    cache = KVCache(32, 4096, 8, 128, 128, "f16", "f16")        # 2 x 32 x 8 x 4096 x 128 x 2 B = 1 GiB
    keys, values = cache.k.data, cache.v.data
    for layer in range(32):
        cache.store(layer, 0, rows, rows)
    cache.n_past = 100
    for layer in range(32):
        cache.store(layer, 100, rows[:1], rows[:1])      # one more position: no copy, same arrays
    assert cache.k.data is keys and cache.v.data is values
    assert cache.capacity == GROW_CHUNK and cache.nbytes == cache.max_nbytes // (4096 // GROW_CHUNK)
    written = 2 * 32 * 8 * 104 * 128 * 2       # 101 positions, rounded up to whole 4 KiB pages per head
    held = _resident_bytes() - before
    assert held < 2 * written + (16 << 20), f"{held} bytes resident for {written} bytes written"
    assert np.array_equal(cache.k.read(5, 0, 100), rows.transpose(1, 0, 2).astype(np.float16).astype(np.float32))
    cache.release()
    assert cache.nbytes == 0 and _resident_bytes() - before < 16 << 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="limits the address space with Linux's RLIMIT_AS")
def test_a_cache_that_cannot_be_reserved_is_a_memory_error():
    """Under an address-space limit (ulimit -v) the cache's reservation fails as a MemoryError naming the KV cache,
    not as an OSError from mmap."""
    import subprocess
    import sys
    code = ("import resource\n"
            "from ggml_backend.model.kv_cache import KVCache\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "try:\n"
            "    KVCache(32, 65536, 8, 128, 128)\n"
            "except MemoryError as error:\n"
            "    print('MemoryError:', error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MemoryError: cannot reserve 4096.0 MiB for the KV cache" in result.stdout, result.stderr[-2000:]


def _fma32(a, b, c):
    """float32 a * b + c rounded once (the float64 product of two float32 is exact; the sum rounds twice only on an
    exact float32 midpoint, which these random values do not reach)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _score_in_written_order(q, k):
    """The attention score as ``attention._score`` states its order, in numpy: value d into lane d % 16
    in turn, the 16 lanes folded halves first, then the rest value by value."""
    n = len(q)
    end = n - n % 16
    lanes = np.zeros(16, np.float32)
    for d in range(0, end, 16):
        lanes = _fma32(q[d:d + 16], k[d:d + 16], lanes)
    while len(lanes) > 1:
        lanes = lanes[:len(lanes) // 2] + lanes[len(lanes) // 2:]
    s = lanes[0]
    for d in range(end, n):
        s = _fma32(q[d:d + 1], k[d:d + 1], np.array([s], np.float32))[0]
    return s


@pytest.mark.parametrize("head_dim", [64, 128, 80, 72])
@pytest.mark.parametrize("storage", ["f32", "f16"])
def test_attention_scores_are_summed_in_one_written_order(head_dim, storage):
    """The scores' summation order is the code's, not the compiler's: with the kernels' fast-math a plain loop's
    order followed LLVM's tuning for the host CPU, and the same prompt gave other logits on a Sapphire Rapids than
    on a Zen 4. Compiled without reassociation, every score equals the order ``_score`` states, computed
    here in numpy (the kernels' fast-math may regroup it, by rules that do not depend on the CPU)."""
    from numba import njit

    from ggml_backend.model.attention import _score

    @njit(fastmath={"nnan", "ninf", "nsz", "arcp", "contract", "afn"})    # fast-math but no reassociation
    def scores(q, keys):
        out = np.empty(keys.shape[1], np.float32)
        for j in range(keys.shape[1]):
            out[j] = _score(q, 0, 0, keys, 0, j)
        return out

    rng = np.random.default_rng(head_dim)
    q = rng.standard_normal((1, 1, head_dim)).astype(np.float32)
    values = rng.standard_normal((1, 9, head_dim)).astype(np.float32)
    keys = values if storage == "f32" else values.astype(np.float16).view(np.uint16)
    as_floats = values if storage == "f32" else values.astype(np.float16).astype(np.float32)
    expected = np.array([_score_in_written_order(q[0, 0], as_floats[0, j]) for j in range(9)], np.float32)
    assert np.array_equal(scores(q, keys), expected)
